{#- Fails on every row where the SQL expression is not true (null counts as a failure). The model is
    aliased `m`, so a correlated subquery can name its row (`m.day`). Narrow it with dbt's own
    `config: {where: ...}`. -#}
{% test expression_is_true(model, expression, column_name=none) %}
select *
from (select * from {{ model }}) as m
where not coalesce(({{ expression }}), false)
{% endtest %}
