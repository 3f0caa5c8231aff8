# Developer shortcuts; CI runs `bash .ci/run`, which is setup + C tests + the README's test command.
PY ?= python3

.PHONY: setup build test test-pure ctest lint typecheck bench lab-verify demo clean

setup:            ## install system packages and the package (editable, native engine built)
	bash .ci/setup

build:            ## (re)build the native engine in place
	$(PY) setup.py build_ext --inplace

test: ctest       ## C unit tests, the whole Python suite, then the peer-level tests on the pure engine
	$(PY) -m pytest
	$(MAKE) test-pure

test-pure:        ## peer-level tests (tests/aio, tests/lab, tests/backend) again with the pure engine as the default
	PYHOLEPUNCH_ENGINE=pure $(PY) -m pytest tests/aio tests/lab tests/backend \
		--ignore=tests/lab/test_classify.py --ignore=tests/lab/test_lab.py --ignore=tests/lab/test_lab_verify.py --ignore=tests/lab/test_lab_ipv6.py

ctest:
	$(MAKE) -C csrc test

lint:
	$(PY) -m ruff check pyholepunch tests bench

typecheck:
	$(PY) -m mypy pyholepunch

bench:            ## benchmarks with a JSON report in bench/results/report.json
	$(PY) -m pytest bench -p no:cacheprovider --benchmark-group-by=func

lab-verify:
	$(PY) -m pyholepunch lab verify

demo:
	$(PY) -m pyholepunch demo

clean:
	$(MAKE) -C csrc clean
	rm -rf build dist *.egg-info pyholepunch/engine/_native.c pyholepunch/engine/*.so
