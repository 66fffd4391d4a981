{#- A rate or share: null (not defined) or within [0, 1]. -#}
{% test is_share(model, column_name) %}
select *
from {{ model }}
where {{ column_name }} is not null
  and ({{ column_name }} < 0 or {{ column_name }} > 1 or {{ column_name }} = 'NaN'::double precision)
{% endtest %}
