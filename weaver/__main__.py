"""`python -m weaver`: run the weaver service against an existing NATS server."""

from weaver.app import main

raise SystemExit(main())
