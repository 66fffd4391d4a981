-- Daily country figures for country_risk (definition: macros/risk_daily.sql).
{{ risk_daily_figures('country', 'stg_country_risk_daily') }}
