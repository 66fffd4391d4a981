{#- Models land in exactly the schema they configure (`staging`, `marts`), not dbt's default
    `<target schema>_<custom schema>`, so analysts and the dashboard find `marts.*`. -#}
{% macro generate_schema_name(custom_schema_name, node) -%}
    {%- if custom_schema_name is none -%}
        {{ target.schema }}
    {%- else -%}
        {{ custom_schema_name | trim }}
    {%- endif -%}
{%- endmacro %}
