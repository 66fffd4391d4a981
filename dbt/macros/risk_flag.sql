{#- The ranked risk flag of merchant_risk and country_risk (one rule set for both keys).

    Rules, first match wins (its code and text become the reason); only rows with at least
    `risk_min_tx` payments are judged, so a handful of payments never raises a flag:
      1 high      fraud rate >= risk_fraud_rate_high                         fraud_rate
      2 high      transactions z (7- or 30-day baseline) >= risk_z_high        volume_spike
      3 high      value z (7- or 30-day baseline) >= risk_z_high               value_spike
      4 elevated  fraud rate >= risk_fraud_rate_elevated                     fraud_rate
      5 elevated  transactions z >= risk_z_elevated                          volume_spike
      6 elevated  value z >= risk_z_elevated                                 value_spike
      7 elevated  amount outlier share >= risk_outlier_share_elevated        amount_outliers
      otherwise   normal, no reason
    The fraud rate is the matured one when the day has matured, else the rate on labels reported so
    far: a lower bound of the final rate, so a day already above the bar is worth flagging.
    risk_score puts every signal on the z scale (a fraud rate at the "high" bar scores risk_z_high)
    and orders rows within a level. -#}
{% macro risk_flag_columns(key) -%}
{%- set fr_basis = "case when fraud_rate_matured is not null then 'matured' else 'labels so far' end" -%}
{%- set fr = "coalesce(fraud_rate_matured, fraud_rate_to_date)" -%}
{%- set z_tx = "greatest(tx_count_z_7d, tx_count_z_30d)" -%}
{%- set z_amt = "greatest(amount_sum_z_7d, amount_sum_z_30d)" -%}
{%- set judged = "tx_count >= " ~ var('risk_min_tx') -%}
with_rule as (
    select
        *,
        case
            when not ({{ judged }}) then null
            when {{ fr }} >= {{ var('risk_fraud_rate_high') }} then 1
            when {{ z_tx }} >= {{ var('risk_z_high') }} then 2
            when {{ z_amt }} >= {{ var('risk_z_high') }} then 3
            when {{ fr }} >= {{ var('risk_fraud_rate_elevated') }} then 4
            when {{ z_tx }} >= {{ var('risk_z_elevated') }} then 5
            when {{ z_amt }} >= {{ var('risk_z_elevated') }} then 6
            when amount_outlier_share >= {{ var('risk_outlier_share_elevated') }} then 7
        end as risk_rule,
        case when {{ judged }} then greatest(
            {{ fr }} / {{ var('risk_fraud_rate_high') }} * {{ var('risk_z_high') }},
            {{ z_tx }},
            {{ z_amt }},
            amount_outlier_share / {{ var('risk_outlier_share_elevated') }} * {{ var('risk_z_elevated') }},
            0.0
        ) else 0.0 end as risk_score_raw
    from daily
),

flagged as (
    select
        *,
        case
            when risk_rule in (1, 2, 3) then 'high'
            when risk_rule in (4, 5, 6, 7) then 'elevated'
            else 'normal'
        end as risk_level,
        case
            when risk_rule in (1, 4) then 'fraud_rate'
            when risk_rule in (2, 5) then 'volume_spike'
            when risk_rule in (3, 6) then 'value_spike'
            when risk_rule = 7 then 'amount_outliers'
        end as risk_reason_code,
        case
            when risk_rule in (1, 4) then format('fraud rate %s%% (%s) >= %s%%',
                round((100 * {{ fr }})::numeric, 1), {{ fr_basis }},
                round(100 * (case when risk_rule = 1 then {{ var('risk_fraud_rate_high') }}
                                  else {{ var('risk_fraud_rate_elevated') }} end)::numeric, 1))
            when risk_rule in (2, 5) then format('transactions %s, z = %s against the trailing baseline',
                tx_count, round({{ z_tx }}::numeric, 1))
            when risk_rule in (3, 6) then format('value %s USD, z = %s against the trailing baseline',
                round(amount_sum_usd::numeric, 0), round({{ z_amt }}::numeric, 1))
            when risk_rule = 7 then format('%s%% of payments at >= 5x the card holder''s 30-day mean',
                round((100 * amount_outlier_share)::numeric, 0))
        end as risk_reason
    from with_rule
),

ranked as (
    select
        *,
        round(risk_score_raw::numeric, 3)::double precision as risk_score,
        row_number() over (
            partition by day
            order by case when risk_rule <= 3 then 2 when risk_rule is not null then 1 else 0 end desc,
                risk_score_raw desc, {{ key }}
        ) as risk_rank
    from flagged
)
{%- endmacro %}
