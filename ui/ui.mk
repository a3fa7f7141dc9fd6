# torchloom web UI build and browser setup; the top Makefile does `-include ui/ui.mk`.
# ui-setup: npm ci when package-lock.json is newer than node_modules, then build into weaver/static.
# browser-setup: Debian's chromium and the playwright pip package (never `playwright install`).

UI_DIR ?= ui
UI_PY ?= .venv/bin/python
UI_STAMP := $(UI_DIR)/node_modules/.torchloom-ci-stamp
UI_BUILD_STAMP := $(UI_DIR)/node_modules/.torchloom-build-stamp
UI_SOURCES := $(wildcard $(UI_DIR)/src/*.js $(UI_DIR)/src/*.css $(UI_DIR)/src/*.html) \
	$(UI_DIR)/build.mjs $(UI_DIR)/package.json proto/torchloom/v1/torchloom.proto

.PHONY: ui-setup ui-build ui-test browser-setup

$(UI_STAMP): $(UI_DIR)/package-lock.json $(UI_DIR)/package.json
	cd $(UI_DIR) && npm ci --no-audit --no-fund
	touch $@

$(UI_BUILD_STAMP): $(UI_STAMP) $(UI_SOURCES)
	cd $(UI_DIR) && npm run build
	touch $@

ui-setup: $(UI_BUILD_STAMP)

ui-build: $(UI_STAMP)
	cd $(UI_DIR) && npm run build

ui-test: $(UI_STAMP)
	cd $(UI_DIR) && npm run gen && node --test test/

browser-setup:
	@if [ ! -x /usr/bin/chromium ]; then apt-get update && apt-get install -y chromium; fi
	@$(UI_PY) -c "import playwright" 2>/dev/null || $(UI_PY) -m pip install "playwright>=1.45"
