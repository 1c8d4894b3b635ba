"""Ingest: OTLP requests in, Arrow columns into the store's writer, in two processes, three under load.

    frontend process (frontend.py)    receivers -> ExportHandler (check) -> Intake: segment log, fdatasync -> ack
                                                                                   | Record (the payload's place)
    decoding (decoder.py)             payload read back -> Normalizer -> Arrow columns: in serve's process, or
                                      in the decoder process while decoding needs more than a small share of a core
                                                                                   | Batch
    serve's process (supervisor.py)   IngestSupervisor -> StoreWriter (group commit) -> Ack / Nack to the frontend

- frontend: receives, checks each request (span count, invalid spans: the C scanner's dry run),
  appends the payload to the segment log, fdatasyncs (group commit) and acknowledges. It counts
  the acknowledged spans not yet committed against ``store.queue_max_spans``; beyond it clients
  get UNAVAILABLE, so a store that falls behind does not turn into unbounded memory.
- decoder: reads each payload back (page cache), normalizes it and sends the columns on.
- supervisor: starts, watches and stops the children, decodes records itself or passes them to the
  decoder process (``DecodePolicy``, ``receivers.decoder_process``), hands the batches to the writer and
  answers each record with an Ack (committed) or a Nack.

Why processes: decoding is GIL-bound Python, the receivers are GIL-bound Python, and DuckDB's
Python binding takes the GIL back many times while an INSERT runs (measured: 80k -> 5k rows/s
with one busy Python thread beside it). Three GILs let the three run side by side under load, and
decoding is off the acknowledgement path either way. At rest and at typical rates decoding is a
small share of a core and shares serve's GIL, which saves the decoder's interpreter (~50 MB).
messages.py lists what crosses the pipes.

The rule for an acknowledged record that cannot be decoded or inserted: it is never dropped
silently. The record is set aside (``store/quarantine.py``): its payload bytes are copied to
``DATA_DIR/quarantine/`` with a note saying why, listed in the ``quarantine`` table, counted in
``shadowlens_records_quarantined_total{stage="decode"|"insert"}`` and named once in the log; the
frontend gets a Nack that says where it went, and ingest goes on. This holds for decoding
(stage ``decode``, in either process), the writer (stage ``insert``) and the replay of the segment log on
start (either stage, or ``read`` for bytes between records that no longer frame as one: a record
damaged on disk after its acknowledgement, or a write the full disk refused and nobody acknowledged).
A failure that is not about the record (I/O, a broken database) sets nothing aside: the record stays
in the segment log and the next start inserts it.
"""
