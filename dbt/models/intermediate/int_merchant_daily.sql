-- Daily merchant figures for merchant_risk (definition: macros/risk_daily.sql).
{{ risk_daily_figures('merchant_id', 'stg_merchant_risk_daily') }}
