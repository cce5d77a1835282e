"""The forwarding queue, settings and pure policies, without network peers.

R-XCH-4 (durable queue, backoff, stop, retry, leases across crashes),
R-XCH-5 (commitment bookkeeping, dataset hashes), R-XCH-6 (no lossy syntax is
ever proposed), R-OPS-2 (configuration errors name the key).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)
from test_forward_peers import (
    dataset_bytes,
    dataset_sha,
    dimse_destination,
    ingest,
    make_instance,
    make_study,
    open_gateway,
    tls_table,
    write_config,
)

from gateway.forward import commitment
from gateway.forward import destinations as d
from gateway.forward.batch import SendItem
from gateway.forward.integrity import digest_file
from gateway.forward.queue import ForwardQueue, JobSource
from gateway.forward.stow_send import interpret_response
from gateway.settings import load_settings
from pki import devpki
from pki.errors import ConfigurationError, InvalidInputError

RETRY = d.RetrySettings(max_attempts=3, backoff_base_seconds=10, backoff_max_seconds=25)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pki(dev_pki: devpki.DevPki) -> devpki.DevPki:
    return dev_pki


def _sources(n: int, study: str = "1.2.3", prefix: str = "1.2.3.4.") -> list[JobSource]:
    return [JobSource(f"{prefix}{i}", study, "1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian,
                      f"{i:064x}", 100) for i in range(n)]


@pytest.fixture
def queue(tmp_path: Path) -> tuple[ForwardQueue, Clock]:
    clock = Clock()
    return ForwardQueue(tmp_path / "db.sqlite", clock=clock), clock


# --- settings --------------------------------------------------------------------------


def test_destinations_routing_and_retention_parse(tmp_path: Path, pki: devpki.DevPki) -> None:
    web = (f'[destinations.web]\nrole = "partner"\ntransport = "dicomweb"\n'
           f'url = "https://pacs.example/dicom-web"\n[destinations.web.tls]\n{tls_table(pki)}\n')
    config = write_config(
        tmp_path, pki, dimse_destination("ext-store", pki, 11112, commitment=True,
                                         retry="max_attempts = 4\n") + web,
        extra='[routing]\non_receive = ["ext-store"]\n[retention]\nkeep_local_days = 3650\n',
    )
    s = load_settings(config)
    ext = s.destinations["ext-store"]
    assert ext.storage_commitment and ext.retry.max_attempts == 4 and ext.called_ae == "DEST"
    assert ext.tls.certificate == pki.cert_path("gateway-server")
    assert s.destinations["web"].tls_name == "pacs.example"
    assert s.routing.on_receive == ("ext-store",)
    assert s.retention.keep_local_days == 3650


@pytest.mark.parametrize(
    ("table", "extra", "key"),
    [
        ("", '[routing]\non_receive = ["nowhere"]\n', "routing.on_receive[0]"),
        ('url = "http://plain.example"\n', "", "https://"),
        ("colour = 1\n", "", "destinations.x.colour"),
        ("storage_commitment = true\n", "", "storage_commitment"),
    ],
)
def test_bad_destination_configuration_is_refused_naming_the_key(
    tmp_path: Path, pki: devpki.DevPki, table: str, extra: str, key: str
) -> None:
    url = "" if "url" in table else 'url = "https://pacs.example/dw"\n'
    dest = (f'[destinations.x]\nrole = "pacs"\ntransport = "dicomweb"\n{url}{table}'
            f"[destinations.x.tls]\n{tls_table(pki)}\n")
    config = write_config(tmp_path, pki, dest, extra=extra)
    with pytest.raises(ConfigurationError) as err:
        load_settings(config)
    assert key in err.value.message


# --- transfer syntax policy (R-XCH-6) ------------------------------------------------


@pytest.mark.parametrize("ts", [RLELossless, JPEGBaseline8Bit, JPEG2000, JPEGLSLossless,
                                ExplicitVRBigEndian])
def test_compressed_or_big_endian_originals_are_offered_only_as_themselves(ts: str) -> None:
    assert d.proposed_syntaxes(ts) == (ts,)


def test_uncompressed_little_endian_may_use_the_other_uncompressed_syntax() -> None:
    assert d.proposed_syntaxes(ExplicitVRLittleEndian) == (ExplicitVRLittleEndian,
                                                           ImplicitVRLittleEndian)
    assert d.choose_syntax(ExplicitVRLittleEndian, [ImplicitVRLittleEndian]) == \
        ImplicitVRLittleEndian
    assert d.choose_syntax(RLELossless, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) is None


def test_context_plan_single_syntax_contexts_and_budget() -> None:
    ct = "1.2.840.10008.5.1.4.1.1.2"
    plan = d.plan_contexts([(ct, ExplicitVRLittleEndian), (ct, RLELossless),
                            (ct, ExplicitVRLittleEndian)], storage_commitment=True)
    assert plan.contexts == (
        (ct, (ExplicitVRLittleEndian,)), (ct, (ImplicitVRLittleEndian,)), (ct, (RLELossless,)),
        (d.STORAGE_COMMITMENT_PUSH, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
    )
    many = [(f"1.2.3.{i}", RLELossless) for i in range(200)]
    plan = d.plan_contexts(many)
    assert len(plan.contexts) == d.MAX_CONTEXTS and len(plan.included) == d.MAX_CONTEXTS


def test_no_syntax_reason_is_plain_words() -> None:
    text = d.no_syntax_reason("1.2.840.10008.5.1.4.1.1.2", RLELossless, True)
    assert text.startswith("destination accepts no lossless transfer syntax for CT Image Storage")


def test_backoff_doubles_and_is_capped() -> None:
    assert [RETRY.delay_after(n) for n in (1, 2, 3, 4)] == [10, 20, 25, 25]


# --- the queue ---------------------------------------------------------------------------


def test_one_job_per_instance_and_destination(queue: tuple[ForwardQueue, Clock]) -> None:
    q, _ = queue
    assert q.enqueue(_sources(3), "a", created_by="t", reason="r").new == 3
    again = q.enqueue(_sources(3), "a", created_by="t", reason="r")
    assert (again.new, again.present) == (0, 3)
    assert q.enqueue(_sources(3), "b", created_by="t", reason="r").new == 3
    assert len(q.list_jobs()) == 6


def test_claim_takes_one_study_and_counts_the_attempt(queue: tuple[ForwardQueue, Clock]) -> None:
    q, _ = queue
    q.enqueue(_sources(2, "1.1", "1.1.9.") + _sources(2, "2.2", "2.2.9."), "a",
              created_by="t", reason="r")
    batch = q.claim("a", "w1", 10, 30)
    assert {j.study_uid for j in batch} == {"1.1"} and all(j.attempts == 1 for j in batch)
    assert {j.study_uid for j in q.claim("a", "w2", 10, 30)} == {"2.2"}
    assert q.claim("a", "w3", 10, 30) == []


def test_expired_lease_makes_a_crashed_send_claimable(queue: tuple[ForwardQueue, Clock]) -> None:
    q, clock = queue
    q.enqueue(_sources(2), "a", created_by="t", reason="r")
    first = q.claim("a", "dead-worker", 10, 30)
    clock.now += 29
    assert q.claim("a", "w2", 10, 30) == []  # still leased
    q.renew([j.id for j in first], "dead-worker", 30)
    clock.now += 29
    assert q.claim("a", "w2", 10, 30) == []  # the heartbeat extended it
    clock.now += 2
    again = q.claim("a", "w2", 10, 30)
    assert [j.id for j in again] == [j.id for j in first] and again[0].attempts == 2


def test_failures_back_off_then_stop_and_retry_resumes(queue: tuple[ForwardQueue, Clock]) -> None:
    q, clock = queue
    q.enqueue(_sources(1), "a", created_by="t", reason="r")
    for attempt, delay in ((1, 10), (2, 20)):
        (job,) = q.claim("a", "w", 1, 30)
        assert job.attempts == attempt
        assert q.mark_failure(job.id, "cannot connect", RETRY) == "queued"
        assert q.claim("a", "w", 1, 30) == []
        clock.now += delay
    (job,) = q.claim("a", "w", 1, 30)
    assert q.mark_failure(job.id, "cannot connect", RETRY) == "failed"
    (stopped,) = q.list_jobs(state="failed")
    assert stopped.last_error == "cannot connect" and stopped.audited == 0
    clock.now += 10_000
    assert q.claim("a", "w", 1, 30) == []  # stopped jobs wait for an operator
    assert q.retry(destination="a") == 1
    (job,) = q.claim("a", "w", 1, 30)
    assert job.attempts == 1


def test_permanent_failure_stops_at_once(queue: tuple[ForwardQueue, Clock]) -> None:
    q, _ = queue
    q.enqueue(_sources(1), "a", created_by="t", reason="r")
    (job,) = q.claim("a", "w", 1, 30)
    assert q.mark_failure(job.id, "no lossless syntax", RETRY, permanent=True) == "failed"


def test_sent_only_from_a_claimed_job_and_release_costs_no_attempt(
    queue: tuple[ForwardQueue, Clock],
) -> None:
    q, _ = queue
    q.enqueue(_sources(2), "a", created_by="t", reason="r")
    (j1,) = [j for j in q.list_jobs() if j.sop_uid.endswith(".0")]
    assert not q.mark_sent(j1.id, confirmed="x", sent_syntax="t", dataset_sha256="0" * 64,
                           dataset_offset=0, meta=None)
    a, b = q.claim("a", "w", 2, 30)
    assert q.mark_sent(a.id, confirmed="C-STORE success", sent_syntax=ExplicitVRLittleEndian,
                       dataset_sha256="f" * 64, dataset_offset=300, meta=b"m")
    q.release([b.id], "w")
    states = {j.id: (j.state, j.attempts) for j in q.list_jobs()}
    assert states == {a.id: ("sent", 1), b.id: ("queued", 0)}


def test_commitment_success_failure_and_unknown_transaction(
    queue: tuple[ForwardQueue, Clock],
) -> None:
    q, clock = queue
    q.enqueue(_sources(3), "a", created_by="t", reason="r")
    jobs = q.claim("a", "w", 3, 30)
    for j in jobs:
        q.mark_sent(j.id, confirmed="ok", sent_syntax="t", dataset_sha256="a" * 64,
                    dataset_offset=1, meta=None)
    q.begin_commitment("9.9.1", "a", [j.id for j in jobs], 3600)
    out = q.apply_commitment("9.9.1", [jobs[0].sop_uid, jobs[1].sop_uid],
                             [(jobs[2].sop_uid, "no such object instance")])
    assert (len(out.committed), len(out.failed)) == (2, 1)
    states = [j.state for j in q.list_jobs()]
    assert states == ["committed", "committed", "failed"]
    assert q.apply_commitment("9.9.1", [jobs[0].sop_uid], []).committed  # idempotent
    with pytest.raises(commitment.UnknownTransactionError):
        q.apply_commitment("9.9.404", [jobs[0].sop_uid], [])


def test_overdue_commitment_is_sent_again(queue: tuple[ForwardQueue, Clock]) -> None:
    q, clock = queue
    q.enqueue(_sources(1), "a", created_by="t", reason="r")
    (job,) = q.claim("a", "w", 1, 30)
    q.mark_sent(job.id, confirmed="ok", sent_syntax="t", dataset_sha256="a" * 64,
                dataset_offset=1, meta=None)
    q.begin_commitment("9.9.2", "a", [job.id], 100)
    q.finish_batch([job.id], "w")
    assert q.expire_commitments(lambda _n: RETRY) == 0
    clock.now += 101
    assert q.expire_commitments(lambda _n: RETRY) == 1
    (again,) = q.list_jobs()
    assert again.state == "queued" and "deadline" in again.last_error


def test_routing_scan_queues_every_stored_instance_once(tmp_path: Path, pki: devpki.DevPki) -> None:
    config = write_config(tmp_path, pki, dimse_destination("ext", pki, 11112),
                          extra='[routing]\non_receive = ["ext"]\n')
    gw = open_gateway(config)
    try:
        q = ForwardQueue(gw.settings.store.database)
        study = make_study(1, 3)
        for f in study.files[:2]:
            ingest(gw, f)
        assert q.route_new_instances(["ext"]) == 2
        ingest(gw, study.files[2])
        assert q.route_new_instances(["ext"]) == 1
        assert q.route_new_instances(["ext"]) == 0
        assert {j.created_by for j in q.list_jobs()} == {"routing"}
    finally:
        gw.close()


# --- integrity, reports, responses --------------------------------------------------------


def test_digest_separates_meta_and_dataset(tmp_path: Path) -> None:
    data = make_instance("1.2.3", "1.2.3.1", 1)
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    digest = digest_file(path)
    assert digest.meta + dataset_bytes(data) == data
    assert digest.dataset_sha256 == dataset_sha(data)


def test_commitment_report_parsing() -> None:
    info = commitment.build_action_information("1.2.9", [("1.2.840.1", "1.2.3.1")])
    info.FailedSOPSequence = []
    report = commitment.parse_event_report(1, info)
    assert report.succeeded == (("1.2.840.1", "1.2.3.1"),) and report.failed == ()
    with pytest.raises(InvalidInputError):
        commitment.parse_event_report(3, info)
    assert "no such object instance" in commitment.failure_words(0x0112)


def test_report_from_the_wrong_ae_is_refused_and_alerted(tmp_path: Path,
                                                         pki: devpki.DevPki) -> None:
    config = write_config(tmp_path, pki, dimse_destination("arch", pki, 11112,
                                                           called_ae="ARCHIVE", commitment=True))
    gw = open_gateway(config)
    try:
        from gateway.forward.queue import open_queue

        q = open_queue(gw.settings.store.database)
        q.enqueue(_sources(1), "arch", created_by="t", reason="r")
        (job,) = q.claim("arch", "w", 1, 30)
        q.mark_sent(job.id, confirmed="ok", sent_syntax="t", dataset_sha256="a" * 64,
                    dataset_offset=1, meta=None)
        q.begin_commitment("1.2.77", "arch", [job.id], 3600)
        info = commitment.build_action_information("1.2.77", [("1.2.840.1", job.sop_uid)])
        peer = SimpleNamespace(ae_title="INTRUDER", address="127.0.0.9")
        event = SimpleNamespace(
            request=SimpleNamespace(AffectedSOPClassUID=d.STORAGE_COMMITMENT_PUSH, EventTypeID=1),
            event_information=info,
            assoc=SimpleNamespace(is_requestor=False, requestor=peer, acceptor=None),
        )
        status, _ = commitment.handle_n_event_report(gw, event)
        assert status == commitment.PROCESSING_FAILURE
        assert q.list_jobs()[0].state == "sent"
        alerts = [r.event for r in gw.audit.iter_records()
                  if r.event.reason_code == "wrong-ae-title"]
        assert alerts and "INTRUDER" in alerts[0].description
    finally:
        gw.close()


def test_stow_response_is_checked_per_instance() -> None:
    items = [SendItem(i, f"1.2.{i}", "1.2.840.1", ExplicitVRLittleEndian, "0" * 64, Path("x"))
             for i in (1, 2, 3)]
    body = {
        "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.1"]}}]},
        "00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.2"]},
                                            "00081197": {"vr": "US", "Value": [0x0111]}}]},
    }
    ok, bad = interpret_response(202, body, items)
    assert set(ok) == {1}
    assert bad[2][1] is True and "different content" in bad[2][0]
    assert bad[3] == ("the STOW-RS response (HTTP 202) does not confirm this instance", False)


def test_retention_floor_is_validated() -> None:
    assert d.RetentionSettings().keep_local_days == 0
    with pytest.raises(ValueError):
        d.RetentionSettings(keep_local_days=-1)


def test_provider_with_query_permission_is_refused_at_start(
    tmp_path: Path, pki: devpki.DevPki
) -> None:
    """R-EXT-1: the external storage provider may not query or retrieve for any purpose."""
    from gateway.forward.worker import Forwarder
    from gateway.instance import partner_from_certificate

    dest = dimse_destination("ext", pki, 11112, extra='partner = "provider"')
    config = write_config(tmp_path, pki, dest.replace('role = "pacs"',
                                                      'role = "external-storage"'))
    gw = open_gateway(config)
    try:
        gw.store.add_partner(partner_from_certificate(
            "provider", pki.cert_path("storage-provider"), ae_titles=("EXTSTORE",),
            permissions=("query",), role="external-storage"))
        with pytest.raises(ConfigurationError) as err:
            Forwarder(gw).prepare()
        assert "destinations.ext.partner" in err.value.message and "R-EXT-1" in err.value.message
    finally:
        gw.close()
