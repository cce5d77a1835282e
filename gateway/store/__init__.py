"""Instance files and metadata: the content store (R-XCH-5, R-OPS-1)."""
