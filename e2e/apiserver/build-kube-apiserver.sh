#!/usr/bin/env bash
# Build kube-apiserver, kube-scheduler and kube-controller-manager 1.20.2 from Debian's
# `kubernetes` source package (1.20.5+really1.20.2) and cache them outside the repository, for the
# real-API-server test tier (e2e/tests/apiserver_*; the scheduler and the controller manager run
# in its node-loss test).
#
#   e2e/apiserver/build-kube-apiserver.sh        # build once, or reuse the cached binary
#
# The binaries land in ${TWOSITE_CACHE:-~/.cache/twosite}/<name>-1.20.2. Cached binaries that all
# run (`--version`) are reused and nothing else happens. Otherwise the script:
#   1. derives a `deb-src` entry from this machine's own Debian sources (one-line or deb822) and
#      keeps it in a private apt state directory, so the system's apt configuration is untouched;
#   2. installs the toolchain and runtime from Debian with the system apt: golang-1.19-go, the
#      reflect2 and json-iterator sources, etcd-server (the store the tests run) and openssl;
#   3. `apt-get source kubernetes` into a temporary directory;
#   4. replaces the vendored github.com/modern-go/reflect2 (1.0.1, crashes at run time under
#      Go >= 1.18) and github.com/json-iterator/go with Debian's packaged sources;
#   5. builds them offline in one `make WHAT="cmd/kube-apiserver cmd/kube-scheduler
#      cmd/kube-controller-manager"` (GOFLAGS=-mod=vendor GOPROXY=off CGO_ENABLED=0, Go 1.19 from
#      /usr/lib/go-1.19/bin).
# Every step is printed; any failure stops the script with the reason and a non-zero status.
set -euo pipefail

VERSION=1.20.2
CACHE_DIR="${TWOSITE_CACHE:-$HOME/.cache/twosite}"
COMPONENTS=(kube-apiserver kube-scheduler kube-controller-manager)
GO_BIN_DIR=/usr/lib/go-1.19/bin

step() { printf '==> %s\n' "$*" >&2; }
die() { printf 'build-kube-apiserver: FAILED: %s\n' "$*" >&2; exit 1; }

all_cached=1
for c in "${COMPONENTS[@]}"; do
    bin="$CACHE_DIR/$c-$VERSION"
    if [ -x "$bin" ] && version=$("$bin" --version 2>/dev/null); then
        step "cached: $bin ($version)"
    else
        [ -e "$bin" ] && step "$bin exists but does not run"
        all_cached=0
    fi
done
if [ "$all_cached" = 1 ]; then
    step "reusing the cached binaries"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "not root and no sudo: cannot install Debian packages"
    SUDO=(sudo)
fi
command -v apt-get >/dev/null || die "apt-get not found: this script needs a Debian (bookworm) machine"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/twosite-kube-apiserver.XXXXXX")
if [ "${TWOSITE_KEEP_BUILD:-0}" != 1 ]; then
    trap 'rm -rf "$WORK"' EXIT
else
    step "keeping the build directory $WORK (TWOSITE_KEEP_BUILD=1)"
fi
START=$(date +%s)

# --- 1. a deb-src entry from the machine's Debian sources, in a private apt state -------------
step "deriving a deb-src entry from the machine's Debian sources"
APT="$WORK/apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/etc"
SRC_LIST="$APT/etc/sources.list"
: >"$SRC_LIST"

# One-line format: "deb [opts] URI suite components..." -> the same line with deb-src.
one_line_sources=()
[ -f /etc/apt/sources.list ] && one_line_sources+=(/etc/apt/sources.list)
for f in /etc/apt/sources.list.d/*.list; do [ -f "$f" ] && one_line_sources+=("$f"); done
for f in "${one_line_sources[@]}"; do
    grep -E '^[[:space:]]*deb[[:space:]]' "$f" | grep -Ei 'debian' \
        | sed -E 's/^[[:space:]]*deb[[:space:]]/deb-src /' >>"$SRC_LIST" || true
done
# deb822 format: stanzas with Types/URIs/Suites/Components/Signed-By.
for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk '
        function flush() {
            if (types ~ /(^|[[:space:]])deb($|[[:space:]])/ && uris ~ /debian/ && enabled != "no") {
                n = split(uris, u, /[[:space:]]+/); m = split(suites, s, /[[:space:]]+/)
                for (i = 1; i <= n; i++) for (j = 1; j <= m; j++) {
                    if (u[i] == "" || s[j] == "") continue
                    opt = (signed != "") ? "[signed-by=" signed "] " : ""
                    print "deb-src " opt u[i] " " s[j] " " comps
                }
            }
            types = uris = suites = comps = signed = enabled = ""
        }
        /^[[:space:]]*#/ { next }
        /^[[:space:]]*$/ { flush(); next }
        {
            key = tolower($1); sub(/:$/, "", key)
            val = $0; sub(/^[^:]*:[[:space:]]*/, "", val)
            if (key == "types") types = val
            else if (key == "uris") uris = val
            else if (key == "suites") suites = val
            else if (key == "components") comps = val
            else if (key == "signed-by") signed = val
            else if (key == "enabled") enabled = tolower(val)
        }
        END { flush() }
    ' "$f" >>"$SRC_LIST"
done
[ -s "$SRC_LIST" ] || die "no Debian 'deb' entry found in /etc/apt/sources.list or /etc/apt/sources.list.d/*"
sed 's/^/    /' "$SRC_LIST" >&2

APT_PRIVATE=(
    -o "Dir::Etc::SourceList=$SRC_LIST"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$APT/lists"
    -o "Dir::Cache=$APT/cache"
    -o "Dir::Cache::archives=$APT/cache/archives"
    -o "Debug::NoLocking=1"
)
step "apt-get update (private state in $APT)"
apt-get "${APT_PRIVATE[@]}" update >"$WORK/apt-update.log" 2>&1 \
    || { tail -n 20 "$WORK/apt-update.log" >&2; die "private apt-get update failed"; }

# --- 2. toolchain and runtime from Debian (system apt) ----------------------------------------
PKGS=(golang-1.19-go golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev
    etcd-server openssl dpkg-dev make rsync)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    step "installing ${missing[*]} (system apt)"
    "${SUDO[@]}" apt-get update >"$WORK/sys-update.log" 2>&1 \
        || { tail -n 20 "$WORK/sys-update.log" >&2; die "apt-get update failed"; }
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y --no-install-recommends \
        "${missing[@]}" >"$WORK/install.log" 2>&1 \
        || { tail -n 30 "$WORK/install.log" >&2; die "apt-get install ${missing[*]} failed"; }
else
    step "toolchain already installed: ${PKGS[*]}"
fi
[ -x "$GO_BIN_DIR/go" ] || die "$GO_BIN_DIR/go missing after installing golang-1.19-go"

# --- 3. the source tree --------------------------------------------------------------------------
step "apt-get source kubernetes (into $WORK/src)"
mkdir -p "$WORK/src"
(cd "$WORK/src" && apt-get "${APT_PRIVATE[@]}" source kubernetes) >"$WORK/source.log" 2>&1 \
    || { tail -n 30 "$WORK/source.log" >&2; die "apt-get source kubernetes failed"; }
TREE=$(find "$WORK/src" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n 1)
[ -n "$TREE" ] || die "no kubernetes-* directory after apt-get source"
step "source tree: $TREE"
grep -q "gitVersion.*v$VERSION\|$VERSION" "$TREE/debian/changelog" 2>/dev/null \
    || step "warning: debian/changelog does not mention $VERSION"
[ -d "$TREE/vendor" ] || die "$TREE has no vendor/ directory: cannot build offline"

# --- 4. replace reflect2 and json-iterator with Debian's ----------------------------------------
replace_vendored() { # <import path>
    local path=$1 from="/usr/share/gocode/src/$1" to="$TREE/vendor/$1"
    [ -d "$from" ] || die "$from missing (Debian package not installed?)"
    [ -d "$to" ] || die "$to missing: the tree does not vendor $path"
    step "replacing vendor/$path with $from"
    rm -rf "$to"
    mkdir -p "$to"
    # Sources only (no tests, no nested packages' tests); symlinks resolved.
    (cd "$from" && find . -type f \( -name '*.go' -o -name '*.s' -o -name 'LICENSE' \) ! -name '*_test.go' \
        -print0 | while IFS= read -r -d '' f; do mkdir -p "$to/$(dirname "$f")"; cp -L "$f" "$to/$f"; done)
}
replace_vendored github.com/modern-go/reflect2
replace_vendored github.com/json-iterator/go
for p in github.com/modern-go/reflect2 github.com/json-iterator/go; do
    v=$(dpkg-query -W -f='${Version}' "$( [ "$p" = github.com/json-iterator/go ] \
        && echo golang-github-json-iterator-go-dev || echo golang-github-modern-go-reflect2-dev)")
    step "  $p now from Debian $v"
done

# --- 5. build ----------------------------------------------------------------------------------------
export PATH="$GO_BIN_DIR:$PATH"
# Kubernetes 1.20's hack/ scripts build in GOPATH mode (hack/lib/init.sh exports GO111MODULE=off
# and links the tree into _output/local/go); they copy binaries with rsync and first build and run
# the code generators (deepcopy, conversion, openapi), whose output is not in the source package.
# So `make` is the only way: a bare `go build ./cmd/kube-apiserver` lacks the generated files.
export GOFLAGS=-mod=vendor GOPROXY=off CGO_ENABLED=0
export GOCACHE="$WORK/gocache" GOPATH="$WORK/gopath"
WHAT="${COMPONENTS[*]/#/cmd/}"
step "make WHAT=\"$WHAT\" with $(go version) (GOFLAGS=$GOFLAGS GOPROXY=$GOPROXY CGO_ENABLED=$CGO_ENABLED); takes minutes"
BUILD_START=$(date +%s)
(cd "$TREE" && make WHAT="$WHAT") >"$WORK/make.log" 2>&1 \
    || { tail -n 40 "$WORK/make.log" >&2; die "make WHAT=\"$WHAT\" failed (log above)"; }
step "built in $(( $(date +%s) - BUILD_START )) s"
mkdir -p "$CACHE_DIR"
for c in "${COMPONENTS[@]}"; do
    built="$TREE/_output/local/bin/linux/amd64/$c"
    [ -x "$built" ] || built=$(find "$TREE/_output" -type f -name "$c" -perm -u+x | head -n 1)
    [ -n "$built" ] && [ -x "$built" ] || die "make succeeded but no $c binary under $TREE/_output"
    version=$("$built" --version 2>&1) || die "the built $c does not run: $version"
    step "$c reports: $version"
    bin="$CACHE_DIR/$c-$VERSION"
    cp "$built" "$bin.tmp.$$"
    mv "$bin.tmp.$$" "$bin"
    step "cached as $bin"
done
step "total $(( $(date +%s) - START )) s"
