#!/bin/sh
# `pip <command> ...` from the bind-mounted wheelhouse (/wheels: amd64; /wheels/<arch>: others)
# when it holds wheels, else from the index (plus TORCH_INDEX_URL, e.g. PyTorch's CPU builds).
set -eu
dir=/wheels
[ "${TARGETARCH:-amd64}" = amd64 ] || dir="/wheels/$TARGETARCH"
cmd=$1
shift
if ls "$dir"/*.whl >/dev/null 2>&1; then
    set -- --no-index --find-links "$dir" "$@"
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    set -- --extra-index-url "$TORCH_INDEX_URL" "$@"
fi
exec pip "$cmd" --quiet "$@"
