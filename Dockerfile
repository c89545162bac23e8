# Build stage: librdkafka is compiled from the crate's bundled sources.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && strip target/release/inventory-consumer

# Runtime: no shell needed; the binary is the entry point.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/inventory-consumer /usr/local/bin/inventory-consumer
# distroless "nonroot": numeric, so that runAsNonRoot can verify it
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/inventory-consumer"]
CMD ["run"]
