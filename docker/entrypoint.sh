#!/bin/sh
# Container entry point, run under tini (PID 1 forwards SIGTERM to the server, which then shuts
# down gracefully: in-flight requests finish, new connections are refused).
#   serve       (default) the HTTP API: `mta serve`
#   worker      fine-tune jobs from the shared Redis queue: `mta worker`
#   init-banks  seed an empty bank volume once: $BANK_ROOT/current -> the shipped demo bank
#               ($SHIPPED_BANK), or a RANDOM demo bank when the image ships none (idempotent)
#   anything else is executed as given (e.g. `mta bank build ...`, `sh`)
set -eu

case "${1:-serve}" in
serve | worker)
    exec mta "$@"
    ;;
init-banks)
    root="${BANK_ROOT:-/banks}"
    shipped="${SHIPPED_BANK:-/app/bank_artifacts/demo}"
    if [ -f "$root/current/manifest.json" ]; then
        echo "init-banks: $root/current already set -> $(readlink "$root/current" || echo 'a directory')"
        exit 0
    fi
    if [ -f "$shipped/manifest.json" ]; then
        name=demo
        if [ ! -f "$root/$name/manifest.json" ]; then
            rm -rf "$root/.$name.tmp"
            cp -r "$shipped" "$root/.$name.tmp"
            mv "$root/.$name.tmp" "$root/$name"
        fi
    else
        name=random-demo
        [ -f "$root/$name/manifest.json" ] || mta bank random --out "$root/$name"  # written atomically
    fi
    # Atomic flip: a reader sees the old link or the new one, never none.
    ln -sfn "$name" "$root/.current.tmp"
    mv -T "$root/.current.tmp" "$root/current"
    echo "init-banks: $root/current -> $name"
    ;;
*)
    exec "$@"
    ;;
esac
