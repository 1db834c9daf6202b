#!/usr/bin/env bash
# Test 41 (Kafka consumer-group hand-over between two clusters, slow handlers
# running while partitions move, a fast stop and a crash restart) with the
# cooperative-sticky assignor: incremental rebalances, where eventbus takes
# and gives back partitions with rd_kafka_incremental_assign/unassign.  The
# same records are counted (lost, twice, in both databases, order across
# them), and cluster 1 must give up only the partitions that move.
T41_ASSIGNOR=cooperative-sticky exec "$(dirname "$0")/41_kafka_group.sh"
