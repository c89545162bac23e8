# Build stage: librdkafka is compiled from the crate's bundled sources.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p inventory-consumer && strip target/release/inventory-consumer

# The development tools (`inventory-dev`: produce, broker, demo, bench), built only when asked
# for (`--target devtools`; docker-compose.yml's `producer` profile). Never in the service's image.
FROM build AS devtools-build
RUN cargo build --release --locked -p inventory-devtools && strip target/release/inventory-dev

FROM gcr.io/distroless/cc-debian12:nonroot AS devtools
COPY --from=devtools-build /src/target/release/inventory-dev /usr/local/bin/inventory-dev
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/inventory-dev"]

# Runtime, the default target: the service alone. No shell needed; the binary is the entry point.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/inventory-consumer /usr/local/bin/inventory-consumer
# distroless "nonroot": numeric, so that runAsNonRoot can verify it
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/inventory-consumer"]
CMD ["run"]
