# The single `tenantry` binary (operator, API, CRD printer) on a minimal non-root image.
# Build: docker build -t tenantry/tenantry:0.1.0 .   (matches the chart's default image)

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY migrations migrations
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin tenantry && rm -rf src
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin tenantry \
    && strip target/release/tenantry

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 tenantry && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin tenantry
COPY --from=build /src/target/release/tenantry /usr/local/bin/tenantry
# The default migration set is embedded in the binary; a copy is shipped for reference and
# for --migrations-dir.
COPY migrations /usr/share/tenantry/migrations
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/tenantry"]
CMD ["controller"]
