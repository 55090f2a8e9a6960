#!/bin/sh
# Runs once on an empty data volume: the image creates the MLflow database (POSTGRES_DB); this
# adds the Airflow metadata and feedback databases, owned by the same user.
set -e
for db in airflow feedback; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -c "CREATE DATABASE \"$db\" OWNER \"$POSTGRES_USER\""
done
