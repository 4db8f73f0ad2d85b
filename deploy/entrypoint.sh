#!/bin/sh
# The image's entrypoint: runs its command (`prefect flow-run execute`, `dvc repro`, `imagepipe
# ...`) unchanged, except in one case that otherwise ends in a traceback deep inside DVC
# (`Permission denied: '.dvc/tmp'`, exit 255): the working folder is a project checkout
# (dvc.yaml) that this user cannot write, typically a host folder bind-mounted into the
# container, owned by the host user while the image runs as uid 10001. Then one line says
# what to do, and the exit code is 2 (bad input: retrying cannot help). USER, because a uid
# that the image's /etc/passwd does not know makes DVC fail on getpwuid() without it.
if [ -f dvc.yaml ] && ! [ -w . ]; then
    owner=$(stat -c '%u:%g' .)
    echo "imagepipe: $(pwd) (owner $owner) is not writable by uid $(id -u): run the container" \
         "with --user $owner -e HOME=/tmp -e USER=<name>, or chown -R $(id -u):$(id -g) the" \
         "host folder (README: The worker image and the Docker pool)" >&2
    exit 2
fi
exec "$@"
