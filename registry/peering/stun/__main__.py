"""`python -m registry.peering.stun`: the responder without Django (responder.main)."""

from registry.peering.stun.responder import main

raise SystemExit(main())
