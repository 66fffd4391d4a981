{#- The read-only analyst role: SELECT on the marts and nothing else (no USAGE on the staging
    schema or on the mirrored source schema). NOLOGIN: people get it by `GRANT lakehouse_analyst TO
    <their login>`; the marts stay readable across rebuilds through default privileges plus an
    explicit grant after every run. `--vars '{analyst_role: ""}'` turns this off (e.g. on a server
    where the dbt user may not create roles). -#}

{% macro ensure_analyst_role() -%}
{%- set role = var('analyst_role', '') -%}
{%- if role -%}
do $$
begin
    if not exists (select 1 from pg_roles where rolname = '{{ role }}') then
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

{% macro grant_analyst_access() -%}
{%- set role = var('analyst_role', '') -%}
{%- if role -%}
grant usage on schema {{ adapter.quote(generate_schema_name('marts', none)) }} to {{ adapter.quote(role) }};
grant select on all tables in schema {{ adapter.quote(generate_schema_name('marts', none)) }} to {{ adapter.quote(role) }};
{%- else -%}
select 1
{%- endif -%}
{%- endmacro %}
