{#- The read-only analyst role: SELECT on the marts and nothing else (no USAGE on the staging
    schema or on the mirrored source schema). NOLOGIN: people get it by `GRANT lakehouse_analyst TO
    <their login>`; the marts stay readable across rebuilds through default privileges plus an
    explicit grant after every run. `--vars '{analyst_role: ""}'` turns this off (e.g. on a server
    where the dbt user may not create roles). A dbt user that may not create roles, on a server
    without the role, gets one error that says so and how to fix it. -#}

{% macro ensure_analyst_role() -%}
{%- set role = var('analyst_role', '') -%}
{%- if role -%}
do $$
begin
    if not exists (select 1 from pg_roles where rolname = '{{ role }}') then
        if not exists (select 1 from pg_roles where rolname = current_user and (rolcreaterole or rolsuper)) then
            raise exception '%', format('the analyst role %I does not exist and the dbt user %I may not create '
                'roles. Fix: create it once as an admin (CREATE ROLE %I NOLOGIN;), or ALTER ROLE %I CREATEROLE;, '
                'or build without it: --vars ''{analyst_role: ""}''',
                '{{ role }}', current_user, '{{ role }}', current_user);
        end if;
        create role {{ adapter.quote(role) }} nologin;
    end if;
end
$$;
create schema if not exists {{ adapter.quote(generate_schema_name('marts', none)) }};
grant usage on schema {{ adapter.quote(generate_schema_name('marts', none)) }} to {{ adapter.quote(role) }};
alter default privileges in schema {{ adapter.quote(generate_schema_name('marts', none)) }}
    grant select on tables to {{ adapter.quote(role) }};
{%- else -%}
select 1
{%- endif -%}
{%- endmacro %}

{#- Only when the role is there: when the run-start hook could not make it, its error is the one told. -#}
{% macro grant_analyst_access() -%}
{%- set role = var('analyst_role', '') -%}
{%- if role -%}
do $$
begin
    if exists (select 1 from pg_roles where rolname = '{{ role }}') then
        grant usage on schema {{ adapter.quote(generate_schema_name('marts', none)) }} to {{ adapter.quote(role) }};
        grant select on all tables in schema {{ adapter.quote(generate_schema_name('marts', none)) }} to {{ adapter.quote(role) }};
    end if;
end
$$;
{%- else -%}
select 1
{%- endif -%}
{%- endmacro %}
