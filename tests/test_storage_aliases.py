"""staging/production aliases: optimistic concurrency with If-Match, audit log, against moto over HTTP."""

from __future__ import annotations

import threading

import pytest
from storage_helpers import EXPORTS, make_buckets

from export_lib.results import BadInputError
from export_lib.storage.aliases import (
    AliasConflictError,
    alias_history,
    aliased_versions,
    resolve_alias,
    set_alias,
)
from export_lib.storage.store import Store

STORE = Store(EXPORTS, "exports")


@pytest.fixture
def s3(s3_client):
    make_buckets(s3_client)
    for v in ("v1", "v2", "v3", "v4"):  # published versions are those with a manifest
        s3_client.put_object(Bucket=EXPORTS, Key=f"exports/digits/{v}/manifest.json", Body=b"{}")
    return s3_client


def test_set_get_and_audit_history(s3):
    assert resolve_alias(s3, STORE, "digits", "staging") is None
    first = set_alias(s3, STORE, "digits", "staging", "v1", actor="nightly", reason="new export")
    assert first["changed"] and first["previous"] is None
    second = set_alias(s3, STORE, "digits", "staging", "v2", actor="alice", reason="retrain")
    assert second["previous"] == "v1"
    set_alias(s3, STORE, "digits", "production", "v1", actor="bob", reason="approved")
    noop = set_alias(s3, STORE, "digits", "staging", "v2", actor="alice")
    assert noop["changed"] is False

    pointer = resolve_alias(s3, STORE, "digits", "staging")
    assert pointer["version"] == "v2" and pointer["actor"] == "alice" and pointer["etag"]
    assert aliased_versions(s3, STORE, "digits") == {"staging": "v2", "production": "v1"}
    key = "exports/digits/_aliases/staging.json"
    assert s3.get_object(Bucket=EXPORTS, Key=key)["ContentType"] == "application/json"

    history = alias_history(s3, STORE, "digits", "staging")
    assert [(h["from"], h["to"], h["actor"], h["reason"]) for h in history] == [
        (None, "v1", "nightly", "new export"), ("v1", "v2", "alice", "retrain")]
    assert all(h["at"] for h in history)
    assert len(alias_history(s3, STORE, "digits")) == 3
    audit = s3.list_objects_v2(Bucket=EXPORTS, Prefix="exports/digits/_audit/")["Contents"]
    assert len(audit) == 3 and all("-staging-" in o["Key"] or "-production-" in o["Key"] for o in audit)


def test_refuses_unpublished_version_and_unknown_alias(s3):
    with pytest.raises(BadInputError, match="'nope'.*not published.*published versions"):
        set_alias(s3, STORE, "digits", "staging", "nope", actor="t")
    with pytest.raises(BadInputError, match="unknown alias 'canary'"):
        set_alias(s3, STORE, "digits", "canary", "v1", actor="t")


def test_expected_from_guards_a_stale_decision(s3):
    set_alias(s3, STORE, "digits", "production", "v1", actor="a")
    set_alias(s3, STORE, "digits", "production", "v2", actor="b", reason="hotfix")
    with pytest.raises(AliasConflictError) as e:
        # an approval given while production was v1 must not silently override b's move
        set_alias(s3, STORE, "digits", "production", "v3", actor="c", expected_from="v1")
    assert "now points to 'v2'" in str(e.value) and "'b'" in str(e.value) and "NOT applied" in str(e.value)
    assert resolve_alias(s3, STORE, "digits", "production")["version"] == "v2"


def test_expected_from_on_an_unset_alias_says_it_is_not_set(s3):
    with pytest.raises(AliasConflictError) as e:
        set_alias(s3, STORE, "digits", "staging", "v1", actor="c", expected_from="v0")
    assert "it is not set" in str(e.value) and "None" not in str(e.value) and "NOT applied" in str(e.value)
    assert resolve_alias(s3, STORE, "digits", "staging") is None


@pytest.mark.parametrize("existing", [False, True], ids=["first-creation", "existing-alias"])
def test_concurrent_moves_one_wins_other_gets_clear_conflict(s3, existing, monkeypatch):
    if existing:
        set_alias(s3, STORE, "digits", "staging", "v1", actor="setup")
    # Both movers read the pointer before either writes: the barrier sits between the read and the write.
    barrier = threading.Barrier(2)
    import export_lib.storage.aliases as aliases_mod

    real_write = aliases_mod._write_pointer

    def racing_write(*args, **kwargs):
        barrier.wait(timeout=10)
        return real_write(*args, **kwargs)

    outcomes: dict[str, object] = {}

    def mover(name: str, version: str) -> None:
        try:
            outcomes[name] = set_alias(s3, STORE, "digits", "staging", version, actor=name, reason=f"by {name}")
        except AliasConflictError as e:
            outcomes[name] = e

    monkeypatch.setattr(aliases_mod, "_write_pointer", racing_write)
    threads = [threading.Thread(target=mover, args=(n, v)) for n, v in (("alice", "v3"), ("bob", "v4"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    winners = [n for n, o in outcomes.items() if isinstance(o, dict)]
    losers = [n for n, o in outcomes.items() if isinstance(o, AliasConflictError)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    winner, loser = winners[0], losers[0]
    msg = str(outcomes[loser])
    final = resolve_alias(s3, STORE, "digits", "staging")
    assert final["actor"] == winner and f"moved by '{winner}'" in msg and f"now points to '{final['version']}'" in msg
    assert "was NOT applied" in msg
    # only the winning move is in the audit log
    moves = [h for h in alias_history(s3, STORE, "digits", "staging") if h["actor"] in ("alice", "bob")]
    assert [h["actor"] for h in moves] == [winner]
