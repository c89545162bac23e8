-- The W3C Trace Context of the request a queued reply answers (its `traceparent` and
-- `tracestate` headers), so that the relay, which publishes later and maybe on another replica,
-- sends the reply on in the request's trace (docs/operations.md, "Traces"). NULL: the request
-- carried none, or a release before this migration queued the reply (it publishes without).
ALTER TABLE reply_outbox
    ADD COLUMN traceparent text,
    ADD COLUMN tracestate text;
