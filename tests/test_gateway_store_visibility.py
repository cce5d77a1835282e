"""Who sees what in the SQLite metadata store (R-XCH-2, R-XCH-5).

A partner sees a patient's studies only while a consent to share with that
partner, or with a network it belongs to, is in force; the patient is
identified by ID *and* issuer.  Every query path (studies, series, instances,
retrieval) applies the same rule.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from gateway.store.index import InstanceIndex
from gateway.store.model import AddResult, StudyFilter, Visibility
from gateway.store.sqlite import SqliteMetadataStore, _date_range, _like
from pki.errors import InvalidInputError

A = Visibility("partner-a", ("regional",))
B = Visibility("partner-b", ("regional",))
C = Visibility("partner-c", ())
#: A partner that happens to be named like the network.
NAMED_LIKE_NETWORK = Visibility("regional", ())
HOSPITAL = None
ALL = StudyFilter()


def index(
    patient_id: str,
    issuer: str = "",
    *,
    study: str,
    series: str | None = None,
    sop: str | None = None,
    modality: str = "CT",
    date: str = "20250401",
    name: str = "YAMADA^TARO",
) -> InstanceIndex:
    return InstanceIndex(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=sop or generate_uid(),
        study_uid=study,
        series_uid=series or generate_uid(),
        transfer_syntax="1.2.840.10008.1.2.1",
        patient_id=patient_id,
        issuer=issuer,
        patient_name=name,
        birth_date="19600101",
        sex="M",
        study_date=date,
        study_time="",
        accession="",
        study_description="",
        referring="",
        modality=modality,
        series_number=1,
        series_description="",
        instance_number=1,
        specific_character_set="ISO_IR 192",
    )


class World:
    def __init__(self, path: Path) -> None:
        self.store = SqliteMetadataStore(path)
        self.studies: dict[tuple[str, str], str] = {}
        for pid, issuer in (("P1", ""), ("P1", "OTHER-HOSPITAL"), ("P2", "")):
            study = generate_uid()
            self.studies[(pid, issuer)] = study
            items = [(index(pid, issuer, study=study), "ab" * 32, 10)]
            assert self.store.add_instances(items, "test") == [AddResult.STORED]

    def visible(self, vis: Visibility | None) -> set[tuple[str, str]]:
        """Patients whose study the viewer finds, checked on every query path."""
        by_study = {uid: key for key, uid in self.studies.items()}
        paths = [
            {by_study[str(r["study_uid"])] for r in self.store.query_studies(ALL, vis)},
            {by_study[str(r["study_uid"])] for r in self.store.query_series(None, ALL, vis)},
            {
                by_study[str(r["study_uid"])]
                for r in self.store.query_instances(None, None, ALL, vis)
            },
            {
                key
                for key, uid in self.studies.items()
                if self.store.instances_of(uid, None, None, vis)
            },
        ]
        assert all(p == paths[0] for p in paths), f"query paths disagree: {paths}"
        return paths[0]

    def grant(self, pid: str, kind: str, scope: str, issuer: str = "") -> None:
        self.store.grant_consent(pid, issuer, kind, scope, "reception01")

    def revoke(self, pid: str, kind: str, scope: str, issuer: str = "") -> int:
        return self.store.revoke_consent(pid, issuer, kind, scope, "reception01")


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "meta.sqlite")


P1, P1_OTHER, P2 = ("P1", ""), ("P1", "OTHER-HOSPITAL"), ("P2", "")


def test_without_consent_only_the_hospital_sees_patients(world: World) -> None:
    for vis in (A, B, C, NAMED_LIKE_NETWORK):
        assert world.visible(vis) == set()
    assert world.visible(HOSPITAL) == {P1, P1_OTHER, P2}


def test_partner_consent_is_for_that_partner_and_that_issuer_only(world: World) -> None:
    world.grant("P1", "partner", "partner-a")
    assert world.visible(A) == {P1}  # not P1 of another issuer
    assert world.visible(B) == set()
    assert world.visible(C) == set()


def test_network_consent_reaches_every_member_and_only_members(world: World) -> None:
    world.grant("P2", "network", "regional")
    assert world.visible(A) == {P2}
    assert world.visible(B) == {P2}
    assert world.visible(C) == set()
    # A partner named like the network is not a member of it.
    assert world.visible(NAMED_LIKE_NETWORK) == set()


def test_partner_consent_is_not_a_network_consent(world: World) -> None:
    world.grant("P2", "partner", "regional")
    assert world.visible(A) == set()
    assert world.visible(NAMED_LIKE_NETWORK) == {P2}


def test_revocation_hides_again_and_is_recorded(world: World) -> None:
    world.grant("P1", "partner", "partner-a")
    assert world.revoke("P1", "partner", "partner-a") == 1
    assert world.visible(A) == set()
    assert world.revoke("P1", "partner", "partner-a") == 0  # nothing left to revoke
    [consent] = world.store.list_consents("P1")
    assert consent.revoked_by == "reception01" and consent.revoked_at
    assert consent.granted_by == "reception01" and consent.granted_at <= consent.revoked_at
    world.grant("P1", "partner", "partner-a")  # a new consent, a new record
    assert world.visible(A) == {P1}
    assert len(world.store.list_consents("P1")) == 2


def test_revoking_one_scope_leaves_the_others(world: World) -> None:
    world.grant("P1", "partner", "partner-a")
    world.grant("P1", "network", "regional")
    assert world.visible(B) == {P1}
    assert world.revoke("P1", "network", "regional") == 1
    assert world.visible(A) == {P1}  # still shared with partner-a directly
    assert world.visible(B) == set()
    assert world.revoke("P1", "partner", "partner-b") == 0


def test_revocation_is_per_issuer(world: World) -> None:
    world.grant("P1", "partner", "partner-a")
    world.grant("P1", "partner", "partner-a", issuer="OTHER-HOSPITAL")
    assert world.visible(A) == {P1, P1_OTHER}
    world.revoke("P1", "partner", "partner-a", issuer="OTHER-HOSPITAL")
    assert world.visible(A) == {P1}


def test_filters_do_not_widen_visibility(world: World) -> None:
    world.grant("P1", "partner", "partner-a")
    f = StudyFilter(patient_id="P*")
    assert {r["patient_id"] for r in world.store.query_studies(f, A)} == {"P1"}
    f = StudyFilter(study_uids=tuple(world.studies.values()))
    assert len(world.store.query_studies(f, A)) == 1
    assert world.store.query_studies(StudyFilter(patient_id="P2"), A) == []


def test_consent_scope_kind_is_checked(world: World) -> None:
    with pytest.raises(InvalidInputError):
        world.store.grant_consent("P1", "", "everyone", "x", "reception01")


# --------------------------------------------------------------- add results
def test_add_instances_reports_stored_present_and_conflict(tmp_path: Path) -> None:
    store = SqliteMetadataStore(tmp_path / "m.sqlite")
    study = generate_uid()
    first = index("P1", study=study)
    assert store.add_instances([(first, "aa" * 32, 1)], "x") == [AddResult.STORED]
    assert store.add_instances([(first, "aa" * 32, 1)], "x") == [AddResult.ALREADY_PRESENT]
    assert store.add_instances([(first, "bb" * 32, 1)], "x") == [AddResult.CONFLICT]
    stored = store.find_instance(first.sop_instance_uid)
    assert stored is not None and stored.sha256 == "aa" * 32
    # The same study under another patient is refused: a study has one patient.
    other_patient = index("P9", study=study)
    assert store.add_instances([(other_patient, "cc" * 32, 1)], "x") == [AddResult.CONFLICT]
    assert store.find_instance(other_patient.sop_instance_uid) is None


# --------------------------------------------------------------------- pure
@pytest.mark.parametrize(
    ("pattern", "like"),
    [
        ("YAMADA*", "YAMADA%"),
        ("Y?MADA", "Y_MADA"),
        ("50%_off", "50\\%\\_off"),
        ("a\\b", "a\\\\b"),
        ("山田*", "山田%"),
    ],
)
def test_dicom_wildcards_become_escaped_like_patterns(pattern: str, like: str) -> None:
    assert _like(pattern) == like


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20250101-20251231", ("20250101", "20251231")),
        ("20250101-", ("20250101", "99999999")),
        ("-20251231", ("00000000", "20251231")),
        ("20250401", ("20250401", "20250401")),
    ],
)
def test_date_ranges(value: str, expected: tuple[str, str]) -> None:
    assert _date_range(value) == expected


@pytest.mark.parametrize("value", ["2025", "2025-01-01", "abcdefgh-", "20250101-2025"])
def test_bad_date_ranges_are_refused(value: str) -> None:
    with pytest.raises(InvalidInputError):
        _date_range(value)
