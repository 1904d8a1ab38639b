"""The PACS node: a DICOM protocol adapter beside HTTP and gRPC. A PACS or router sends images over C-STORE
(`scp`); each accepted instance is held in a durable outbox (`outbox`) before the sender hears success; a worker
(`node`) screens it through the same inference path as HTTP and gRPC and stores the SR back to the configured
destination (`scu`), retrying with backoff while it is down. docs/pacs.md describes it."""
