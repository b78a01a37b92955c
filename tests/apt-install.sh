#!/bin/sh
# Installs Debian packages that a make target needs, with apt-get as root or through sudo, or
# stops with a message naming them (where there is no apt-get, or no way to become root).
#
#   tests/apt-install.sh "WHAT" "HINT" PACKAGE...
#
# WHAT names the need in messages ("build dependencies", "what make deploy-test needs"); HINT
# is added where there is no apt-get. With no PACKAGE it does nothing.
what=$1 hint=$2
shift 2
[ $# -gt 0 ] || exit 0
if ! command -v apt-get >/dev/null 2>&1; then
	echo "fanout: missing $what: $* (Debian names; $hint)" >&2
	exit 1
fi
if [ "$(id -u)" = 0 ]; then
	sudo=
elif command -v sudo >/dev/null 2>&1; then
	sudo=sudo
else
	echo "fanout: missing $what: $* (run apt-get install as root)" >&2
	exit 1
fi
echo "fanout: installing $what: $*"
$sudo apt-get update -qq &&
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
