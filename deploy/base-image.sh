#!/usr/bin/env bash
# Builds a Debian base image locally with debootstrap, for machines that cannot pull from a
# registry, and tags it with the exact name the Dockerfiles' FROM lines use.
#
#   deploy/base-image.sh [-s SUITE] [-t TAG] [-m MIRROR] [-f]
#
#   -s  Debian suite                       [trixie]
#   -t  image tag                          [debian:SUITE-slim]
#   -m  Debian mirror                      [the one apt already uses here, from /etc/apt/sources.list*]
#   -f  rebuild even if TAG already exists
#
# The image is a minbase system like the registry's "-slim" images: documentation, man pages and
# locales are not installed (now or by later apt-get installs), and apt keeps no lists or archives.
# An existing TAG is kept (so reruns are fast) unless -f is given. Needs root, debootstrap and
# docker. Only this image's chroot gets the suite's sources; the host's apt sources are untouched.
set -euo pipefail
suite=trixie tag= mirror= force=
while getopts "s:t:m:fh" o; do
	case $o in
	s) suite=$OPTARG ;; t) tag=$OPTARG ;; m) mirror=$OPTARG ;; f) force=1 ;;
	*) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
	esac
done
tag=${tag:-debian:$suite-slim}

if [[ -z $force ]] && docker image inspect "$tag" >/dev/null 2>&1; then
	echo "base-image: $tag exists, kept (-f rebuilds it)"
	exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image: debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || { echo "base-image: debootstrap needs root" >&2; exit 1; }

# The mirrors apt uses: one-line "deb URL suite ..." entries and deb822 "URIs:" fields. The
# archive is the URL ending in /debian, its security archive the one ending in /debian-security.
apt_uris() {
	cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
		awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }'
	cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }'
}
uris=$(apt_uris | sed 's:/*$::')
if [[ -z $mirror ]]; then
	mirror=$(grep -E '/debian$' <<<"$uris" | head -1 || true)
	[[ -n $mirror ]] || { echo "base-image: no Debian mirror in /etc/apt/sources.list*; pass -m URL" >&2; exit 1; }
fi
security=$(grep -E '/debian-security$' <<<"$uris" | head -1 || true)

dir=$(mktemp -d /tmp/fanout-base.XXXXXX)
trap 'rm -rf "$dir"' EXIT
echo "base-image: debootstrap --variant=minbase $suite from $mirror"
start=$(date +%s)
debootstrap --variant=minbase "$suite" "$dir" "$mirror" >"$dir.log" 2>&1 ||
	{ tail -20 "$dir.log" >&2; rm -f "$dir.log"; echo "base-image: debootstrap failed" >&2; exit 1; }
rm -f "$dir.log"

# What the registry's slim images do: no docs, man pages or locales from any later install,
# and apt cleans up after itself.
cat >"$dir/etc/dpkg/dpkg.cfg.d/slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
CFG
cat >"$dir/etc/apt/apt.conf.d/slim" <<'CFG'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
CFG
rm -f "$dir/etc/apt/sources.list"
{
	printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
		"$mirror" "$suite" "$suite"
	[[ -z $security ]] ||
		printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
			"$security" "$suite"
} >"$dir/etc/apt/sources.list.d/debian.sources"
find "$dir/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
rm -rf "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/usr/share/locale/* \
	"$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/* "$dir"/var/log/*.log "$dir"/var/log/apt/* \
	"$dir"/tmp/* "$dir"/dev/* 2>/dev/null || true

tar -C "$dir" --numeric-owner -c . | docker import -c 'CMD ["bash"]' - "$tag" >/dev/null
echo "base-image: $tag built in $(($(date +%s) - start)) s, $(docker image inspect -f '{{.Size}}' "$tag" | awk '{ printf "%.1f MB", $1 / 1e6 }')"
