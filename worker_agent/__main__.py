"""`python -m worker_agent`: run the agent configured from the environment."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
