# The README's two commands: `make serve` and `make test`. Both build .venv first.
.PHONY: setup serve test lint proto bench

ARGS ?=

setup:
	@scripts/setup.sh

serve: setup
	.venv/bin/salience-server $(ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy salience_server salience_client

test: lint
	.venv/bin/pytest -q

proto: setup
	scripts/gen_proto.sh
