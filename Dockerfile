# syntax=docker/dockerfile:1
# pat-rotator as a static binary on distroless: no shell, no package manager, non-root.
# Build: docker build -t pat-rotator:0.1.0 .
# (ring and rustls build with the C compiler of the builder; the OS root certificates
# come from the distroless image's /etc/ssl/certs.)

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
# A fully static glibc binary: glibc >= 2.34 resolves DNS without NSS modules.
ENV RUSTFLAGS="-C target-feature=+crt-static"
RUN cargo build --release --locked --target x86_64-unknown-linux-gnu --bin pat-rotator \
 && cp target/x86_64-unknown-linux-gnu/release/pat-rotator /pat-rotator

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /pat-rotator /usr/local/bin/pat-rotator
# distroless "nonroot": UID/GID 65532, matching the chart's securityContext.
USER 65532:65532
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/pat-rotator"]
CMD ["run"]
