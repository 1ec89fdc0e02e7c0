"""Events: recording them in the transaction of their change, and (later) the stream and
webhooks that read them back in order."""
