#!/usr/bin/env bash
# Fetches Apache Kafka's broker (the version pinned in kafka/pom.xml) and what it needs from
# Maven Central into a cache, once. The tests, `demo --broker apache` and `bench --apache` find
# it in $APACHE_KAFKA_HOME, else in the default below; a DIR argument installs elsewhere (then
# point APACHE_KAFKA_HOME at it).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/pom.xml")"
dir="${1:-${APACHE_KAFKA_HOME:-$HOME/.cache/inventory-consumer/apache-kafka-$version}}"
if [ -f "$dir/installed" ]; then
  echo "Apache Kafka $version is installed in $dir"
  exit 0
fi
echo "installing Apache Kafka $version into $dir"
rm -rf "$dir/libs"
mkdir -p "$dir"
mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies \
  -DincludeScope=runtime -DoutputDirectory="$dir/libs"
ls "$dir/libs/kafka_2.13-$version.jar" >/dev/null
echo "$version" > "$dir/installed"
echo "Apache Kafka $version is installed in $dir"
