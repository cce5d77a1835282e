"""Properties of the pure chain verifier (R-AUD-2): every tampering names the right record."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.audit import instances_transferred, security_alert
from gateway.audit.chain import (
    GENESIS_HASH,
    ChainVerifier,
    Checkpoint,
    StoredRow,
    VerifyReport,
    build_row,
    format_time,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def make_chain(n: int) -> list[StoredRow]:
    rows: list[StoredRow] = []
    prev = GENESIS_HASH
    for seq in range(1, n + 1):
        if seq % 4 == 0:
            event = security_alert("unknown_ca", "issuer not trusted", source_address="192.0.2.1")
        else:
            event = instances_transferred(
                actor=f"partner-{seq % 3}",
                patient_id=f"P{seq % 5}",
                study_uids=[f"1.2.{seq}"],
                instance_count=seq,
            )
        row = build_row(seq, format_time(T0 + timedelta(seconds=seq)), event, prev)
        rows.append(row)
        prev = row.record_hash
    return rows


def verify(rows: list[StoredRow], checkpoint: Checkpoint) -> VerifyReport:
    verifier = ChainVerifier(checkpoint)
    for row in rows:
        verifier.feed(row)
    return verifier.finish()


def head(rows: list[StoredRow]) -> Checkpoint:
    return Checkpoint(rows[-1].seq, rows[-1].record_hash)


CHAINS = {n: make_chain(n) for n in range(1, 31)}
sizes = st.integers(min_value=1, max_value=30)


@given(sizes)
def test_untouched_chain_verifies(n: int) -> None:
    report = verify(CHAINS[n], head(CHAINS[n]))
    assert report.ok and report.head_seq == n and report.problems == ()


@settings(max_examples=200)
@given(st.data())
def test_any_deletion_is_named_at_the_lowest_deleted_record(data: st.DataObject) -> None:
    rows = CHAINS[data.draw(sizes)]
    deleted = data.draw(st.sets(st.sampled_from([r.seq for r in rows]), min_size=1))
    report = verify([r for r in rows if r.seq not in deleted], head(rows))
    assert not report.ok
    assert report.first_bad_seq == min(deleted)


@settings(max_examples=300)
@given(st.data())
def test_any_field_change_is_named_at_that_record(data: st.DataObject) -> None:
    rows = list(CHAINS[data.draw(sizes)])
    i = data.draw(st.integers(min_value=0, max_value=len(rows) - 1))
    column = data.draw(st.sampled_from([f for f in StoredRow._fields if f != "seq"]))
    old = getattr(rows[i], column)
    if isinstance(old, int):
        new: object = data.draw(st.integers().filter(lambda v: v != old))
    else:
        new = data.draw(st.one_of(st.none(), st.text()).filter(lambda v: v != old))
    rows[i] = rows[i]._replace(**{column: new})
    report = verify(rows, head(CHAINS[len(rows)]))
    assert not report.ok
    assert report.first_bad_seq == i + 1, report.problems


@settings(max_examples=100)
@given(st.data())
def test_adjacent_swap_is_named(data: st.DataObject) -> None:
    rows = list(CHAINS[data.draw(st.integers(min_value=2, max_value=30))])
    i = data.draw(st.integers(min_value=0, max_value=len(rows) - 2))
    a, b = rows[i], rows[i + 1]
    rows[i], rows[i + 1] = b._replace(seq=a.seq), a._replace(seq=b.seq)
    report = verify(rows, head(CHAINS[len(rows)]))
    assert not report.ok
    assert report.first_bad_seq == i + 1
    assert report.problem == (
        f"record {i + 1} was inserted or reordered (previous-hash link broken; "
        f"records {i + 1} and {i + 2} were swapped)"
    )
