"""DICOMweb (PS3.18) over mutual TLS: STOW-RS, QIDO-RS, WADO-RS."""
