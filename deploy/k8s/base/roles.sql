-- maitre database roles: one login role per service, each owning only its own
-- schemas. Run once (it is idempotent: re-running it only resets the
-- passwords) by a database admin: a superuser, or a managed database's admin
-- role with CREATEROLE and CREATEDB. Not applied by kustomize.
--
--   psql "postgres://admin@db-host:5432/postgres" \
--        -v memory_password="$(openssl rand -hex 24)" \
--        -v booking_password="$(openssl rand -hex 24)" \
--        -f deploy/k8s/base/roles.sql
--   (optional: -v dbname=other_name; the default database is `maitre`)
--
-- Then each service's DATABASE_URL (Secret key database-url) names its own role:
--   memory-service:  postgres://maitre_memory:<memory_password>@db-host:5432/maitre
--   booking-service: postgres://maitre_booking:<booking_password>@db-host:5432/maitre
--
-- Why:
-- - A service never reads another service's tables (DESIGN.md); with one role
--   per service the database enforces it: maitre_booking cannot read or change
--   schema memory, and a leaked memory-service credential exposes no bookings.
-- - Each role owns its schemas, so the same role runs its migrations (the
--   Kubernetes Jobs) and serves; there is no superuser in any service's URL.
-- - CREATE on the database is granted because the migrations run
--   `CREATE SCHEMA IF NOT EXISTS <schema>`, and PostgreSQL checks the CREATE
--   privilege on the database even when the schema exists. The schemas are
--   created here, owned by the right role, so neither service can claim the
--   other's schema name first. (The grant also lets a role create other
--   schemas of its own; it cannot touch anyone else's.)
-- - The extensions apalis needs (hstore, pgcrypto) are created here by the
--   admin, in schema public (on every role's search_path): apalis's migrations
--   say `CREATE EXTENSION IF NOT EXISTS`, which is then a no-op and needs no
--   privilege.
-- - The roles cannot create databases, so `migrate` finds the database made
--   here. (It checks that it exists through the `postgres` maintenance
--   database, where PUBLIC has CONNECT by default: keep that.)
-- - PostgreSQL 15 no longer lets PUBLIC create objects in schema public; the
--   REVOKE below makes that explicit on older servers too. Nothing of maitre's
--   lives in public except the two extensions.
-- - maitre_booking's search_path in this database is `apalis, public`: two
--   early apalis-postgres migrations create an unqualified function
--   (generate_ulid) that a later one moves to schema apalis. With the default
--   search_path it would land in public, where the role may not create
--   anything ("permission denied for schema public"); with this one it lands
--   in apalis from the start. Tested: both `migrate`s and a booking with its
--   follow-up job run with exactly these privileges.

\set ON_ERROR_STOP on

\if :{?memory_password}
\else
  DO $$ BEGIN RAISE EXCEPTION 'roles.sql: run psql with -v memory_password=...'; END $$;
\endif
\if :{?booking_password}
\else
  DO $$ BEGIN RAISE EXCEPTION 'roles.sql: run psql with -v booking_password=...'; END $$;
\endif
\if :{?dbname}
\else
  \set dbname maitre
\endif

-- Roles (created if missing; the password is (re)set on every run).
SELECT 'CREATE ROLE maitre_memory LOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'maitre_memory') \gexec
SELECT 'CREATE ROLE maitre_booking LOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'maitre_booking') \gexec
ALTER ROLE maitre_memory  LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'memory_password';
ALTER ROLE maitre_booking LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'booking_password';

-- The database, owned by the admin (not by either service).
SELECT format('CREATE DATABASE %I', :'dbname')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'dbname') \gexec
REVOKE ALL ON DATABASE :"dbname" FROM PUBLIC;
GRANT CONNECT, CREATE ON DATABASE :"dbname" TO maitre_memory, maitre_booking;
-- The services set statement_timeout on each connection they open. Behind a
-- transaction-mode pooler (DB_POOLER=transaction) they cannot: PgBouncer
-- refuses the `options` startup parameter, so each role carries it, equal to
-- DB_STATEMENT_TIMEOUT (a service WARNs when the server's differs). Without
-- a pooler it changes nothing: a connection's own setting takes precedence.
ALTER ROLE maitre_memory  IN DATABASE :"dbname" SET statement_timeout = '5s';
ALTER ROLE maitre_booking IN DATABASE :"dbname" SET statement_timeout = '5s';

\connect :"dbname"

REVOKE CREATE ON SCHEMA public FROM PUBLIC;

-- apalis-postgres's migrations use these; pre-created by the admin.
CREATE EXTENSION IF NOT EXISTS hstore WITH SCHEMA public;
CREATE EXTENSION IF NOT EXISTS pgcrypto WITH SCHEMA public;

-- memory-service: schema memory (tables + memory._sqlx_migrations).
CREATE SCHEMA IF NOT EXISTS memory AUTHORIZATION maitre_memory;
ALTER SCHEMA memory OWNER TO maitre_memory;

-- booking-service: schema booking (+ booking._sqlx_migrations) and schema
-- apalis (apalis's job tables + apalis._sqlx_migrations).
CREATE SCHEMA IF NOT EXISTS booking AUTHORIZATION maitre_booking;
ALTER SCHEMA booking OWNER TO maitre_booking;
CREATE SCHEMA IF NOT EXISTS apalis AUTHORIZATION maitre_booking;
ALTER SCHEMA apalis OWNER TO maitre_booking;
ALTER ROLE maitre_booking IN DATABASE :"dbname" SET search_path = apalis, public;

-- Neither role may use the other's schemas (owners have every right on
-- their own; nobody else was granted any).
REVOKE ALL ON SCHEMA memory FROM PUBLIC;
REVOKE ALL ON SCHEMA booking FROM PUBLIC;
REVOKE ALL ON SCHEMA apalis FROM PUBLIC;
