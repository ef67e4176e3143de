#!/bin/sh
# Run once by the postgres image's entrypoint after initdb: let walhoard's replication
# connection in (the image's pg_hba.conf admits replication from loopback only).
echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
