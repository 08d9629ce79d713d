.PHONY: run test lint typecheck check bench

run:        ## set up and serve on the embedded defaults (prints a demo API key)
	scripts/run.sh

test:       ## the whole suite on PostgreSQL + Redis, then on the embedded defaults
	scripts/test.sh

lint:
	scripts/setup.sh dev && .venv/bin/ruff check . && .venv/bin/ruff format --check .

typecheck:
	scripts/setup.sh dev && .venv/bin/mypy .

check: lint typecheck test

bench:
	scripts/setup.sh dev && for f in bench/*.py; do \
		case "$$(basename $$f)" in __init__.py|spy_summary.py) ;; *) .venv/bin/python $$f || exit $$?;; esac; \
	done
