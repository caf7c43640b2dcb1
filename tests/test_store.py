"""The SQLite store: rows survive a reopen, client ids are minted once, and a store written by
the first wave (table ``prompts`` without the later columns) is upgraded in place."""
import sqlite3

from comfy_ws_proxy.model import Job, JobState
from comfy_ws_proxy.store import SqliteJobStore

FIRST_WAVE_SCHEMA = """
CREATE TABLE prompts (
    prompt_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, state TEXT NOT NULL, payload TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, ord INTEGER NOT NULL, number REAL,
    attempts INTEGER NOT NULL DEFAULT 0, outcome_unknown INTEGER NOT NULL DEFAULT 0,
    backend TEXT NOT NULL DEFAULT 'default'
);
CREATE INDEX prompts_unfinished ON prompts(state, ord);
"""


def test_jobs_and_client_ids_survive_a_reopen(tmp_path):
    path = str(tmp_path / "store.sqlite3")
    store = SqliteJobStore(path)
    job = Job("a" * 8, "alice", JobState.RUNNING, {"prompt": {"1": {}}}, backend="default", timeout_s=60,
              started_at=1.5)
    store.insert(job)
    job.outputs["9"] = {"images": [{"filename": "x.png"}]}
    store.save(job)
    client_id = store.client_id("alice", "default")
    assert store.client_id("alice", "default") == client_id  # minted once
    assert store.client_id("bob", "default") != client_id
    assert store.client_id("alice", "gpu2") != client_id     # one per (user, backend)
    store.close()
    again = SqliteJobStore(path)
    [loaded] = again.load_jobs()
    assert (loaded.job_id, loaded.owner, loaded.state, loaded.payload, loaded.timeout_s, loaded.started_at,
            loaded.outputs, loaded.told) == (job.job_id, "alice", "running", job.payload, 60, 1.5, job.outputs, False)
    assert again.client_id("alice", "default") == client_id
    second = Job("b" * 8, "alice", JobState.QUEUED, {})
    again.insert(second)
    assert second.order > loaded.order  # the order goes on where it was
    again.close()


def test_a_first_wave_store_is_upgraded_in_place(tmp_path):
    path = str(tmp_path / "old.sqlite3")
    db = sqlite3.connect(path)
    db.executescript(FIRST_WAVE_SCHEMA)
    db.executemany("INSERT INTO prompts VALUES (?,?,?,?,?,?,?,?,?,?,?)", [
        ("q", "alice", "queued", '{"prompt": {"1": {}}}', 1.0, 1.0, 1, None, 0, 0, "default"),
        ("s", "alice", "success", None, 1.0, 2.0, 2, 3, 1, 0, "default"),
    ])
    db.commit()
    db.close()
    store = SqliteJobStore(path)
    jobs = {j.job_id: j for j in store.load_jobs()}
    assert jobs["q"].state == "queued" and jobs["q"].payload == {"prompt": {"1": {}}}
    assert jobs["s"].told  # a first-wave outcome was sent when it happened: not owed again
    assert not jobs["q"].outputs and jobs["q"].timeout_s == 0
    store.save(jobs["q"])  # and the new columns are written
    store.close()
