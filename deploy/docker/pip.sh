#!/bin/sh
# `pip <command> ...` from the bind-mounted wheelhouse (/wheels: amd64; /wheels/<arch>: others)
# when it holds wheels, else from the index (plus TORCH_INDEX_URL, e.g. PyTorch's CPU builds);
# either way under the platform's lock (lock-<arch>.txt beside this script): every package,
# indirect ones included, at the version the project was tested with.
set -eu
arch=${TARGETARCH:-amd64}
dir=/wheels
[ "$arch" = amd64 ] || dir="/wheels/$arch"
cmd=$1
shift
lock="$(dirname "$0")/lock-$arch.txt"
[ -f "$lock" ] && set -- --constraint "$lock" "$@"
if ls "$dir"/*.whl >/dev/null 2>&1; then
    set -- --no-index --find-links "$dir" "$@"
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    set -- --extra-index-url "$TORCH_INDEX_URL" "$@"
fi
exec pip "$cmd" --quiet "$@"
