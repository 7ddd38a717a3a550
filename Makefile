# The two commands of the README. Each bootstraps .venv by itself.
.PHONY: demo test bench bootstrap

bootstrap:
	scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/rollouttap demo

test: bootstrap
	.venv/bin/python -m pytest -q

bench: bootstrap
	.venv/bin/python bench/run.py
