#!/usr/bin/env bash
# scripts/gpu-bundle.sh [DIR]: gathers, on a Debian 12 machine with apt, what
# scripts/gpu-check.sh needs on a GPU machine that cannot install packages
# (a compute node with no network, an image with only the CUDA toolkit, CMake
# and a compiler): the Debian packages palign builds and runs against, as
# .deb files, and the PAPI data. DIR defaults to .gpu-bundle in the checkout
# (ignored by git). Copy or mount the checkout with DIR there, then run
#
#   scripts/gpu-check.sh --bundle DIR OUTDIR
#
# which unpacks the packages into a folder of its own (never into /), and
# builds and runs against them. About 29 MiB of packages and 4 MiB of data.
#
# The list is what `apt-get install --no-install-recommends` of setup.sh's
# build packages adds to a Debian 12 minbase system that has gcc, g++, make,
# cmake and python3, less what only builds Open MPI's Fortran, Java and
# compiler-wrapper extras (gfortran, perl, autotools), hwloc's X11 and
# OpenCL plugins and ssh (one machine: mpirun starts its ranks itself). The
# build and the tests were run against exactly this set in such a system
# (docs/CUDA.md, "On a GPU machine without packages").
# Environment: PALIGN_PAPI_DIR (default ../shared/papi).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:-$ROOT/.gpu-bundle}
PAPI=${PALIGN_PAPI_DIR:-$ROOT/../shared/papi}

PACKAGES=(
  # the build's own libraries (CMakeLists.txt's pkg_check_modules) and pkg-config
  pkg-config pkgconf pkgconf-bin libpkgconf3
  libcjson1 libcjson-dev libcmocka0 libcmocka-dev libutf8proc2 libutf8proc-dev
  libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 libpcre2-dev
  libprotobuf-c1 libprotobuf-c-dev protobuf-c-compiler libprotoc32 libprotobuf32
  libssl3 libssl-dev zlib1g zlib1g-dev
  libopenblas0 libopenblas0-pthread libopenblas-dev libopenblas-pthread-dev libgfortran5
  # GNU time, for the peak memory of gpu-check's runs
  time
  # Open MPI 4.1 (mpicc for CMake's FindMPI, mpirun) and what its libraries load
  openmpi-bin openmpi-common libopenmpi3 libopenmpi-dev libpmix2 libhwloc15 libevent-core-2.1-7
  libevent-pthreads-2.1-7 libfabric1 libucx0 libibverbs1 ibverbs-providers librdmacm1 libnl-3-200
  libnl-route-3-200 libpsm2-2 libpsm-infinipath1 libnuma1 libltdl7 libmunge2
)

# What the packages above load and nearly every system has: unpacked apart
# and searched last (gpu-check.sh), for a system that lacks one.
FALLBACK=(libudev1 libuuid1 libquadmath0 libatomic1)

die() { printf 'gpu-bundle: error: %s\n' "$*" >&2; exit 1; }
command -v apt-get >/dev/null || die "apt-get not found: run this on a Debian 12 machine"
. /etc/os-release 2>/dev/null || true
[ "${VERSION_CODENAME:-}" = bookworm ] ||
  printf 'gpu-bundle: warning: this is %s, not Debian 12 (bookworm); the list was made for bookworm\n' \
    "${PRETTY_NAME:-an unknown system}" >&2
[ -f "$PAPI/Test-set.json" ] || die "no PAPI data in $PAPI (set PALIGN_PAPI_DIR)"

[ ! -e "$DIR" ] || [ -d "$DIR/debs" ] || die "$DIR exists and is not a bundle: give a new folder"
rm -rf "$DIR.tmp" && mkdir -p "$DIR.tmp/debs" "$DIR.tmp/fallback" "$DIR.tmp/papi"
# apt-get download writes into the current folder, as the user running it
sandbox=()
[ "$(id -u)" -ne 0 ] || sandbox=(-o APT::Sandbox::User=root) # root writing into a folder _apt cannot
# x86-64 packages whatever this machine is: gpu-check.sh runs on x86-64 GPU machines
(cd "$DIR.tmp/debs" && apt-get "${sandbox[@]}" download "${PACKAGES[@]/%/:amd64}" >/dev/null &&
  cd ../fallback && apt-get "${sandbox[@]}" download "${FALLBACK[@]/%/:amd64}" >/dev/null) ||
  die "apt-get download failed (apt sources, network, or run apt-get update; on another architecture, dpkg --add-architecture amd64)"
cp "$PAPI"/* "$DIR.tmp/papi/"
rm -rf "$DIR" && mv "$DIR.tmp" "$DIR"
printf 'gpu-bundle: %s: %d packages and %d fallbacks, %s in all\n' "$DIR" "$(ls "$DIR/debs" | wc -l)" \
  "$(ls "$DIR/fallback" | wc -l)" "$(du -sh "$DIR" | cut -f1)"
