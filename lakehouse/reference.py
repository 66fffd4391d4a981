"""Reference data shared by the generator and the silver transforms.

Fixed FX reference rates (units of base currency per unit of currency, base USD) and the ISO 3166-1
alpha-2 country codes. Keeping them in one module means the generator can never emit a currency the
silver layer does not know how to convert, and the expectation suite validates against the same list.
"""

from __future__ import annotations

#: USD per one unit of the currency. Fixed reference rates: the pipeline converts with these, not
#: with live rates, so features are reproducible.
FX_TO_USD: dict[str, float] = {
    "USD": 1.0,
    "EUR": 1.08,
    "GBP": 1.27,
    "CHF": 1.13,
    "JPY": 0.0067,
    "CAD": 0.73,
    "AUD": 0.66,
    "SEK": 0.095,
    "NOK": 0.093,
    "DKK": 0.145,
    "PLN": 0.25,
    "BRL": 0.18,
    "MXN": 0.055,
    "INR": 0.012,
    "SGD": 0.74,
    "ZAR": 0.054,
}

#: ISO 3166-1 alpha-2 codes (officially assigned).
ISO_COUNTRIES: frozenset[str] = frozenset(
    """
AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV
BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES
ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE
IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY
MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU
NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM
SN SO SR SS ST SV SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG
VI VN VU WF WS YE YT ZA ZM ZW
""".split()
)

#: The currency each generated country pays in (countries the generator populates).
COUNTRY_CURRENCY: dict[str, str] = {
    "US": "USD", "CA": "CAD", "MX": "MXN", "BR": "BRL", "GB": "GBP", "IE": "EUR", "FR": "EUR",
    "DE": "EUR", "ES": "EUR", "IT": "EUR", "NL": "EUR", "BE": "EUR", "PT": "EUR", "AT": "EUR",
    "CH": "CHF", "SE": "SEK", "NO": "NOK", "DK": "DKK", "PL": "PLN", "JP": "JPY", "AU": "AUD",
    "SG": "SGD", "IN": "INR", "ZA": "ZAR",
}

#: Scenario names the generator labels and the model reports recall for.
FRAUD_SCENARIOS: tuple[str, ...] = (
    "card_testing",
    "account_takeover",
    "compromised_merchant",
    "high_amount",
)
