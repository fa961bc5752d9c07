# syntax=docker/dockerfile:1
# The silo image: silo-controller, silo-router and silo (the job runner of backups and restores),
# and the PostgreSQL client tools that Silo's Jobs run (ca-certificates for S3 over HTTPS). The e2e
# harness builds an image with the same contents without a registry or Docker
# (e2e/scripts/images.sh): it reads SILO_BINARIES, SILO_DEBIAN_PACKAGES, PATH, USER and ENTRYPOINT
# from this file, so the two cannot drift apart; in place of this base image it has busybox's shell
# and the same `nonroot` user (65532, which libpq looks up when PGUSER is not set). SILO_BINARIES
# names binaries (cargo build --bin), whichever workspace package they are in.
#
#   docker build -t silo:dev .
ARG SILO_BINARIES="silo-controller silo-router silo"
ARG SILO_DEBIAN_PACKAGES="postgresql-client-15 ca-certificates"

FROM rust:1.95-bookworm AS build
ARG SILO_BINARIES
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked $(for b in $SILO_BINARIES; do printf -- '--bin %s ' "$b"; done) \
    && mkdir /out \
    && for b in $SILO_BINARIES; do cp "target/release/$b" /out/; done

FROM debian:bookworm-slim
ARG SILO_DEBIAN_PACKAGES
RUN apt-get update \
    && apt-get install -y --no-install-recommends $SILO_DEBIAN_PACKAGES \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 65532 --user-group --home-dir /home/nonroot --no-create-home \
       --shell /bin/sh nonroot
COPY --from=build /out/ /usr/local/bin/
ENV PATH=/usr/local/bin:/usr/lib/postgresql/15/bin:/usr/sbin:/usr/bin:/sbin:/bin
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/silo-controller"]
