{#- select * from a source table, or an empty relation with the contract's columns while the mirror
    has not created the table yet (no labels reported, no model scores yet). source() is always
    called, so lineage and freshness still know the dependency. -#}
{% macro source_or_empty(source_name, table_name, columns) -%}
    {%- set src = source(source_name, table_name) -%}
    {%- set rel = none -%}
    {%- if execute -%}
        {%- set rel = adapter.get_relation(database=src.database, schema=src.schema, identifier=src.identifier) -%}
    {%- endif -%}
    {%- if rel is not none or not execute -%}
        select * from {{ src }}
    {%- else -%}
        {{ log("source " ~ src ~ " does not exist yet: " ~ this.identifier ~ " is empty", info=true) }}
        select
        {%- for name, type in columns.items() %}
            cast(null as {{ type }}) as {{ name }}{{ "," if not loop.last }}
        {%- endfor %}
        where false
    {%- endif -%}
{%- endmacro %}
