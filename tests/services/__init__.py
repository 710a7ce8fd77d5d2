"""Real servers for the tests (PostgreSQL, an S3-compatible store, a CloudWatch Logs emulator),
each started on 127.0.0.1 at a free port by a session fixture and stopped after the tests."""
