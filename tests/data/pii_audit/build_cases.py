"""Build ``cases.jsonl``: an independent, hand-written audit set for ``llmforge.data.pii``.

Each case below is a readable literal where PII is marked inline as ``[[kind:value]]``; the builder strips the
markup, computes character offsets and writes one JSON object per line::

    {"text": ..., "spans": [{"kind": ..., "start": ..., "end": ...}], "note": ...}

Run ``python tests/data/pii_audit/build_cases.py`` to regenerate (deterministic; the test checks the committed
file is up to date).

Labelling conventions (what a privacy reviewer would want redacted):

* e-mail: any syntactically valid address, *including* documentation domains (``example.com``/``.org``/``.net``):
  a scrubber cannot know a real mailbox from a placeholder, and redacting a placeholder costs nothing. A
  trailing sentence period is not part of the address. ``git@github.com:org/repo`` (scp-style git remote) and
  ``pkg@1.2.3`` / ``icon@2x.png`` / ``@scope/pkg`` / decorators / CSS at-rules are not addresses.
* phone: the number including a leading ``+``/country code, trunk ``(0)`` and area-code parentheses; an
  extension (``ext. 42`` / ``x42``) is *not* part of the span (the lenient score accepts either). Toll-free
  and fictional ``555-01xx`` numbers are still phone numbers. Bare 10-digit runs are labelled only when the
  text says they are a phone number.
* ipv4/ipv6: public (globally routable) addresses only, without port, brackets or ``/prefix``. Private,
  loopback, link-local, unique-local, unspecified and netmask values are *not* PII. Four-part version numbers
  (``firmware 2.1.0.15``) are not addresses.
* credit_card: Luhn-valid numbers of a real network (Visa, Mastercard, Amex, Discover, Diners, JCB, UnionPay,
  Maestro), well-known test numbers included, with or without spaces/dashes. Masked numbers and Luhn-invalid
  runs are not.
* iban: checksum-valid IBANs in print (4-char groups) or compact form. Bad checksums are not.
* ssn: US SSNs with a valid area/group/serial (not 000/666/9xx, 00, 0000); compact or spaced forms only where
  the text says SSN.
* secret: the credential token itself (not the ``Bearer ``/``key=`` prefix); a PEM private-key block is one
  span from ``-----BEGIN`` to the closing ``-----``. Public keys, certificates, placeholders and masked values
  are not secrets.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

KINDS = ("email", "phone", "ipv4", "ipv6", "credit_card", "iban", "ssn", "secret")
MARK = re.compile(r"\[\[(\w+):(.*?)\]\]", re.DOTALL)
OUT = Path(__file__).with_name("cases.jsonl")


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    s = iban.replace(" ", "")
    s = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in s)) % 97 == 1


PEM_RSA = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
    "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n"
    "LxoS2tFczGkPLPgizskuemMghRniWaoLcyehkd3qqGElvW/VDL5AaWTg0nLVkjRo\n"
    "-----END RSA PRIVATE KEY-----"
)
PEM_PKCS8 = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n"
    "MzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDuictGeurT8jNbvJZHtCSuYEvu\n"
    "-----END PRIVATE KEY-----"
)
PEM_OPENSSH = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "QyNTUxOQAAACDk2Zb0p5kq7Xq8Wm3v1J8e2dL0rXb5oB9tYvKcC4lq3wAAAJgqk0n1KpNJ\n"
    "-----END OPENSSH PRIVATE KEY-----"
)
PEM_EC = (
    "-----BEGIN EC PRIVATE KEY-----\n"
    "MHcCAQEEIIrYSSNQFaA2Hwf1duRSxKtLYX5CB04fSeQ6tF1aY/PuoAoGCCqGSM49\n"
    "AwEHoUQDQgAEPR3tU2Fta9ktY+6P9G0cWO+0kETA6SFs38GecTyudlHz6xvCdz8q\n"
    "-----END EC PRIVATE KEY-----"
)
PEM_PUBLIC = (
    "-----BEGIN PUBLIC KEY-----\n"
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEPR3tU2Fta9ktY+6P9G0cWO+0kETA\n"
    "6SFs38GecTyudlHz6xvCdz8qEzr5qQeUZ1hb0kBPGsVrh3BVOv4tyA==\n"
    "-----END PUBLIC KEY-----"
)
PEM_CERT = (
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBszCCAVmgAwIBAgIUQ5Zl4d2k0xKp1sWv0c9wAzZ2x1cwCgYIKoZIzj0EAwIw\n"
    "-----END CERTIFICATE-----"
)
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2"
    "MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
JWT2 = (
    "eyJhbGciOiJSUzI1NiIsImtpZCI6IjFlOWdkazcifQ.eyJpc3MiOiJodHRwczovL2FjY291bnRzLmdvb2dsZS5jb20iLCJzdWIiOiI"
    "xMTAxNjk0ODQ0NzQzODYyNzY4MzQiLCJhdWQiOiI0MDc0MDg3MTgxOTIuYXBwcyJ9.KRf3Zq8vS2mQ1Lp-5xY0bWnT7cE_4hGdUoJ9aV"
    "r6sBkN2tFyQ3wXe8iLmZ0pO1uHjC5gD7"
)

# fmt: off
CASES: list[tuple[str, str]] = [
    # ---------------------------------------------------------------------------------------------- email
    ("Questions? Write to [[email:jane.doe@acme.io]] and we will get back within two business days.", "email in prose"),
    ("Please contact [[email:support@example.com]].", "docs address at example.com is still labelled; trailing period excluded"),
    ('<a href="mailto:[[email:sales@northwind-traders.com]]">Email sales</a>', "mailto link"),
    ('<a href="mailto:[[email:press@globex.co.uk]]?subject=Interview%20request">press</a>', "mailto with query"),
    ("From: Jane Doe <[[email:jane.doe@acme.io]]>\nTo: Bob Smith <[[email:bob.smith@initech.com]]>\nSubject: Q3 numbers", "mail headers with angle brackets"),
    ("Reply-To: \"Support Team\" <[[email:no-reply+ticket-4471@helpdesk.zendesk.com]]>", "plus tag and hyphens"),
    ("CC: [[email:a.nguyen@students.unimelb.edu.au]], [[email:p.kowalski@uw.edu.pl]]; [[email:m.rossi@unibo.it]]", "address list"),
    ("I emailed him ([[email:Tom.Hardy_88@Yahoo.com]]) twice last week, no answer.", "in parentheses, mixed case"),
    ("Mar 14 09:12:01 mx1 postfix/smtp[2231]: 4F1A2B3C: to=<[[email:ops-alerts@datadoghq.eu]]>, relay=none, status=bounced", "postfix log"),
    ("Mar 14 09:12:04 mx1 postfix/qmgr[1204]: 9C8D7E6F: from=<[[email:bounce-8812-user=corp.com@mailer.sendgrid.net]]>, size=10422", "VERP bounce address"),
    ('{"user": {"id": 4412, "email": "[[email:li.wei@tencent.com]]", "verified": true}}', "JSON field"),
    ("email = '[[email:dev.team@my-startup.dev]]'  # who gets the cron mails", "code string"),
    ("Signed-off-by: Linus Torvalds <[[email:torvalds@linux-foundation.org]]>", "git trailer"),
    ("Author: María José García <[[email:mj.garcia@telefonica.es]]>\nDate:   Tue Mar 12 10:41:07 2024 +0100", "git log header, date must not match"),
    ("If the form fails, mail [[email:INFO@STADTWERKE-MUENCHEN.DE]] or visit the office.", "upper-case address"),
    ("Hi all — new list is [[email:rust-lang-dev@googlegroups.com]], old one is archived.", "google group"),
    ("contact: [[email:x@y.io]]", "very short address"),
    ("Send CVs to [[email:careers@company.technology]] by Friday!", "long TLD"),
    ("Contact: [[email:privacy@example.org]] / [[email:dpo@example.net]]", "two docs addresses"),
    ("Bug reports: [[email:bugs@python.org]]; security issues: [[email:security@python.org]].", "two addresses, semicolon"),
    ("> On Mon, 4 Mar 2024 at 17:02, Peter <[[email:peter.h@gmx.de]]> wrote:\n> > sounds good", "quoted reply header"),
    ("The account [[email:k.tanaka@docomo.ne.jp]] was locked after 5 failed logins.", "JP domain"),
    ("user [[email:first_last@sub.mail.example.com]] subscribed", "subdomain"),
    ("ssh into the box with `ssh deploy@10.0.4.17` then restart nginx", "NEG: ssh user@private-ip is not an email"),
    ("git remote add origin git@github.com:acme/webapp.git", "NEG: scp-style git remote, not an address (ambiguous; reviewer would not redact)"),
    ("@app.route('/login', methods=['POST'])\n@login_required\ndef login():", "NEG: python decorators"),
    ("@media screen and (max-width: 768px) { .nav { display: none; } }\n@import url('theme.css');", "NEG: CSS at-rules"),
    ("npm install @babel/core@7.24.0 @types/node@20.11.5 --save-dev", "NEG: npm scoped packages with versions"),
    ("yarn add react@18.2.0 react-dom@18.2.0", "NEG: pkg@version"),
    ('<img src="/static/img/logo@2x.png" srcset="/static/img/logo@3x.webp 3x">', "NEG: retina image names"),
    ("Thanks @sarah_k and @devops-bob for the review!", "NEG: social handles"),
    ("docker pull nginx@sha256:0d17b565c37bcbd895e9d92315a05c1c3c9a29f762b011a10c54a66cd53c9b31", "NEG: docker digest (also not a secret)"),
    ("git reset --hard HEAD@{2}", "NEG: git reflog syntax"),
    ("@Override\npublic String toString() { return name; }", "NEG: Java annotation"),
    ("Meeting @ 3pm in room B; bring laptops @ all costs", "NEG: @ as 'at'"),
    ("pip install 'requests[socks]>=2.31' && python -m http.server 8000", "NEG: nothing here"),
    ("Our Twitter is @acme_support and our site is acme.io/support", "NEG: handle and bare domain"),

    # ---------------------------------------------------------------------------------------------- phone
    ("Call us at [[phone:(415) 555-0132]] Monday to Friday.", "US (area) xxx-xxxx"),
    ("Phone: [[phone:415-555-0132]]", "US dashes"),
    ("Tel. [[phone:415.555.0132]] (office)", "US dots"),
    ("Reach me on [[phone:+1 415 555 0132]] or WhatsApp.", "US +1 spaces"),
    ("Toll free: [[phone:1-800-555-0199]]", "US toll free with leading 1"),
    ("NYC office [[phone:+1 (212) 555-0187]], fax [[phone:+1 (212) 555-0188]]", "US +1 (area)"),
    ("Main line [[phone:212 555 0187]] ext. 42, or dial [[phone:(646) 555-0123]] x118.", "US with extensions (extension excluded from span)"),
    ("My cell is [[phone:4155550173]] if you need anything", "bare 10 digits, context says phone"),
    ("Call [[phone:1 (888) 555-0142]] for a refund", "US 1 (area)"),
    ("Customer Service: [[phone:+1-503-555-0116]]", "US +1 dashes"),
    ("Kundenservice UK: [[phone:+44 20 7946 0958]]", "UK London intl"),
    ("London office: [[phone:020 7946 0958]]", "UK London national"),
    ("Tel: [[phone:+44 (0)20 7946 0958]]", "UK trunk (0)"),
    ("Text me on [[phone:07700 900123]] after 6.", "UK mobile national"),
    ("Mobile: [[phone:+44 7700 900461]]", "UK mobile intl"),
    ("Manchester: [[phone:0161 496 0000]]; Leeds: [[phone:0113 496 0123]]", "UK geographic"),
    ("NHS 111 or call the surgery on [[phone:01632 960001]].", "UK 5-digit area code; 111 not a phone"),
    ("Rufen Sie uns an: [[phone:+49 30 12345678]]", "DE Berlin intl"),
    ("Telefon: [[phone:030 12345678]]", "DE national"),
    ("Tel.: [[phone:+49 (0)89 1234567]]", "DE with (0)"),
    ("Handy: [[phone:0171 1234567]]", "DE mobile national"),
    ("Mobil: [[phone:+49 171 1234567]]", "DE mobile intl"),
    ("Telefon [[phone:030/12345678]], Fax [[phone:030/12345679]]", "DE slash separator"),
    ("Zentrale: [[phone:089 / 123 456 78]]", "DE spaced slash"),
    ("Hotline [[phone:+49-30-901820]]", "DE dashes"),
    ("Appelez le [[phone:01 23 45 67 89]] pour réserver.", "FR national pairs"),
    ("Tél : [[phone:+33 1 23 45 67 89]]", "FR intl"),
    ("Portable : [[phone:06 12 34 56 78]]", "FR mobile"),
    ("Mobile : [[phone:+33 6 12 34 56 78]]", "FR mobile intl"),
    ("Tél. [[phone:01.23.45.67.89]]", "FR dotted"),
    ("Standard : [[phone:+33 (0)1 42 68 53 00]]", "FR with (0)"),
    ("Call/WhatsApp: [[phone:+91 98765 43210]]", "IN mobile intl"),
    ("Mob: [[phone:+91-98765-43210]]", "IN dashes"),
    ("contact no. [[phone:9876543210]]", "IN bare 10 digits with context"),
    ("Mumbai office: [[phone:+91 22 2345 6789]]; [[phone:022-23456789]]", "IN landline"),
    ("Ligue para [[phone:+55 11 91234-5678]]", "BR mobile intl"),
    ("Telefone: [[phone:(11) 91234-5678]]", "BR mobile national"),
    ("Fixo: [[phone:(21) 2345-6789]]", "BR landline"),
    ("SAC: [[phone:+55 (11) 3456-7890]]", "BR intl with (area)"),
    ("お問い合わせ: [[phone:03-1234-5678]]", "JP Tokyo"),
    ("Tel: [[phone:+81 3-1234-5678]]", "JP intl"),
    ("携帯 [[phone:090-1234-5678]]", "JP mobile"),
    ("Mobile: [[phone:+81 90 1234 5678]]", "JP mobile intl"),
    ("Osaka: [[phone:06-6123-4567]], free dial [[phone:0120-123-456]]", "JP Osaka and freedial"),
    ("Sydney office: [[phone:+61 2 9876 5432]]", "AU intl"),
    ("Ph: [[phone:(02) 9876 5432]]", "AU national"),
    ("Mob: [[phone:0412 345 678]]", "AU mobile"),
    ("Mobile [[phone:+61 412 345 678]]", "AU mobile intl"),
    ("Bookings: [[phone:1300 123 456]]", "AU 1300 number"),
    ("Amsterdam: [[phone:+31 20 123 4567]]", "NL"),
    ("Madrid: [[phone:+34 912 345 678]]", "ES"),
    ("Roma: [[phone:+39 06 1234 5678]]", "IT"),
    ("Beijing mobile: [[phone:+86 138 0013 8000]]", "CN mobile"),
    ("CDMX: [[phone:+52 55 1234 5678]]", "MX"),
    ("Cape Town: [[phone:+27 21 123 4567]]", "ZA"),
    ("Singapore: [[phone:+65 6123 4567]]", "SG"),
    ("E.164: [[phone:+442079460958]] / [[phone:+14155550132]]", "compact E.164"),
    ('<a href="tel:[[phone:+14155550132]]">Call</a>', "tel: link"),
    ("Kontakt: [[phone:+41 44 668 18 00]] (Zürich)", "CH"),
    ("Wien: [[phone:+43 1 5124 5678]]", "AT"),
    ("Warszawa: [[phone:+48 22 123 45 67]]", "PL"),
    ("Call 911 or 112 in an emergency.", "NEG: emergency short codes"),
    ("Invoice 2023-000457 dated 2023-11-04, due 2023-12-04.", "NEG: invoice number and dates"),
    ("ISBN 978-0-306-40615-7 (hardcover), ISBN-10 0-306-40615-2", "NEG: ISBNs"),
    ("Order #112-4567890-1234567 has shipped.", "NEG: Amazon-style order id"),
    ("Tracking number: 1Z999AA10123456784 (UPS)", "NEG: UPS tracking"),
    ("FedEx tracking 7489 2634 7722, USPS 9400 1000 0000 0000 0000 00", "NEG: tracking numbers"),
    ("The population was 8,336,817 in 2020 and 8,804,190 in 2023.", "NEG: populations"),
    ("La population de l'Inde est de 1 428 627 663 habitants.", "NEG: space-grouped thousands"),
    ("Opening hours 09:00-17:30, Sat 10:00-14:00", "NEG: time ranges"),
    ("The conflict lasted from 1914-1918; see pp. 123-145.", "NEG: year and page ranges"),
    ("Timestamp 1710512345 (seconds) / 1710512345678 (ms)", "NEG: unix timestamps"),
    ("SKU: 4006381333931 | EAN 5901234123457 | UPC 036000291452", "NEG: barcodes"),
    ("ZIP 94105-1234; PLZ 80331 München", "NEG: postcodes"),
    ("Brown v. Board of Education, 347 U.S. 483 (1954)", "NEG: legal citation"),
    ("Final score 3-2 after extra time (2-2 at 90')", "NEG: sports scores"),
    ("Reference: 2024/00123/ABC, case no. 21-cv-04567", "NEG: reference numbers"),
    ("Build 20240315.1 passed 1,204 of 1,209 tests in 312.45 s", "NEG: build stats"),
    ("Quantity: 12 x 3.5 kg = 42 kg; total weight 1 250 kg", "NEG: quantities"),
    ("Serial no. S/N 2048-5512-9930", "NEG: serial number"),
    ("Release 2.14.0 (2024-02-28): 148 commits, 37 contributors", "NEG: release notes"),

    # ----------------------------------------------------------------------------------------------- ipv4
    ("Mar 14 03:22:17 web01 sshd[22841]: Failed password for root from [[ipv4:185.220.101.34]] port 52144 ssh2", "sshd log"),
    ('[[ipv4:93.184.216.34]] - - [10/Oct/2023:13:55:36 +0000] "GET /index.html HTTP/1.1" 200 2326 "-" "Mozilla/5.0"', "nginx access log"),
    ("X-Forwarded-For: [[ipv4:66.249.66.1]], 10.0.0.2", "XFF with public and private"),
    ("nameserver [[ipv4:8.8.8.8]]\nnameserver [[ipv4:1.1.1.1]]", "resolv.conf public DNS"),
    ("allow [[ipv4:151.101.1.69]]/32;\ndeny all;", "nginx allow with CIDR (prefix excluded)"),
    ("upstream backend { server [[ipv4:52.14.201.7]]:443; server 10.0.1.12:8080; }", "upstream with ports"),
    ("Your IP address is [[ipv4:81.2.69.142]] (London, GB)", "whatismyip"),
    ("2024-03-15T08:12:44.102Z WARN rate limit exceeded client=[[ipv4:203.0.114.9]] path=/api/v1/login", "structured log; ISO timestamp"),
    ("iptables -A INPUT -s [[ipv4:45.33.32.156]] -j DROP", "iptables"),
    ("ping [[ipv4:142.250.185.78]] -c 4  # google.com", "ping"),
    ("The attack came from [[ipv4:5.188.10.179]] and [[ipv4:91.240.118.222]].", "prose, sentence end"),
    ("Host: [[ipv4:34.117.59.81]]:8443", "Host header with port"),
    ('{"remote_addr": "[[ipv4:100.24.56.7]]", "status": 403}', "JSON"),
    ("Connection from 192.168.1.23 port 51234 to 10.0.0.5 port 22", "NEG: RFC1918 addresses"),
    ("listen 127.0.0.1:5000; bind 0.0.0.0:80", "NEG: loopback and unspecified"),
    ("netmask 255.255.255.0 broadcast 192.168.1.255", "NEG: netmask/broadcast"),
    ("DHCP failed, fell back to 169.254.17.3", "NEG: link-local"),
    ("Docker bridge 172.17.0.1, k8s pods 172.20.3.44", "NEG: 172.16/12 private"),
    ("Upgraded firmware from version 2.1.0.15 to 2.1.0.17", "NEG: 4-part firmware version (context says version)"),
    ("Windows 10.0.19045.4046, Chrome/122.0.6261.112", "NEG: Windows/Chrome versions"),
    ("SNMP OID 1.3.6.1.4.1.2021.10.1.3.1", "NEG: OID"),
    ("Section 4.2.1.3 of the spec defines the retry policy.", "NEG: section number"),
    ("Invalid address 256.300.1.1 rejected; 999.1.1.1 too.", "NEG: out-of-range octets"),
    ("Coordinates 48.8584, 2.2945 (Eiffel Tower)", "NEG: coordinates"),
    ("pi ≈ 3.14159, e ≈ 2.71828, total = $1,234.56", "NEG: numbers and price"),
    ("Ubuntu 22.04.3 LTS, kernel 6.5.0-21-generic, Python 3.11.7", "NEG: versions"),
    ("Dates: 15.03.2024, 03.15.24, 2024.03.15", "NEG: dotted dates"),

    # ----------------------------------------------------------------------------------------------- ipv6
    ("nameserver [[ipv6:2001:4860:4860::8888]]", "Google DNS v6"),
    ("Resolved one.one.one.one to [[ipv6:2606:4700:4700::1111]]", "Cloudflare v6"),
    ("client [[ipv6:2a03:2880:f12f:83:face:b00c:0:25de]] requested /feed", "full 8 groups"),
    ("curl -g 'http://[[[ipv6:2a00:1450:4001:82b::200e]]]:443/'", "bracketed URL host (brackets and port excluded)"),
    ("AAAA record: [[ipv6:2607:f8b0:4005:80a:0:0:0:200e]]", "uncompressed zeros"),
    ("Accepted publickey for admin from [[ipv6:2a02:8108:1234:5600:d4c1:22ff:fe1b:9c0d]] port 50122 ssh2", "sshd v6"),
    ('{"ip": "[[ipv6:2001:0470:0000:0000:0000:0000:0000:0001]]"}', "fully expanded"),
    ("Blocked [[ipv6:2A01:4F8:C17:B8F::2]] for abuse", "upper case"),
    ("X-Real-IP: [[ipv6:2c0f:fb50:4003::]]", "trailing ::"),
    ("v4-mapped client [[ipv6:::ffff:93.184.216.34]] connected", "IPv4-mapped IPv6 labelled as one ipv6 span"),
    ("listen [::]:80; listen [::1]:8080;", "NEG: unspecified/loopback v6"),
    ("inet6 fe80::1ff:fe23:4567:890a%eth0 prefixlen 64 scopeid 0x20<link>", "NEG: link-local"),
    ("ULA prefix fd12:3456:789a:1::1/64 for the lab", "NEG: unique local"),
    ("ether 00:1a:2b:3c:4d:5e txqueuelen 1000", "NEG: MAC address"),
    ("The match kicked off at 20:45:00 and ended at 22:37:12.", "NEG: times"),
    ("Timecode 01:02:03:04 to 01:02:09:12", "NEG: SMPTE timecodes"),
    ("std::vector<std::string> names; auto it = names.begin();", "NEG: C++ scope"),
    ("let map = std::collections::HashMap::<u8, u8>::new();", "NEG: Rust paths"),
    ("John 3:16 and Psalm 23:1-6", "NEG: bible verses"),
    ("Aspect ratio 16:9, scale 1:50000", "NEG: ratios"),
    ("Cache-Control: max-age=3600 ; DEAD:BEEF:CAFE is a placeholder", "NEG: hex words"),
    ("ts=2024-03-15T12:30:45.123456+05:30 level=info", "NEG: ISO timestamp with offset"),

    # ---------------------------------------------------------------------------------------- credit_card
    ("Test card: [[credit_card:4111 1111 1111 1111]], exp 12/28, CVC 123", "Visa test number, spaces"),
    ("Card number [[credit_card:4242-4242-4242-4242]]", "Stripe Visa test, dashes"),
    ("cc=[[credit_card:5555555555554444]]&exp=0127", "Mastercard compact"),
    ("MC 2-series: [[credit_card:2223 0031 2200 3222]]", "Mastercard 2-series"),
    ("Amex [[credit_card:3782 822463 10005]] expires 09/26", "Amex 4-6-5"),
    ("AMEX: [[credit_card:371449635398431]]", "Amex compact"),
    ("Discover [[credit_card:6011 1111 1111 1117]]", "Discover"),
    ("Diners Club: [[credit_card:3056 9309 0259 04]]", "Diners 14-digit"),
    ("JCB [[credit_card:3530 1113 3330 0000]]", "JCB"),
    ("UnionPay [[credit_card:6200 0000 0000 0005]]", "UnionPay"),
    ("Maestro [[credit_card:6759 6498 2643 8453]]", "Maestro"),
    ("I paid with my visa [[credit_card:4000056655665556]] and it got declined??", "Visa debit in forum text"),
    ('{"pan": "[[credit_card:5105105105105100]]", "cvv": "123"}', "JSON PAN"),
    ("Karte: [[credit_card:4012 8888 8888 1881]] gültig bis 03/27", "German context"),
    ("Old Visa: [[credit_card:4222222222222]] (13-digit legacy)", "13-digit Visa"),
    ("Card ending in 4242: **** **** **** 4242", "NEG: masked"),
    ("Card: XXXX-XXXX-XXXX-1234", "NEG: placeholder"),
    ("Transaction 4111 1111 1111 1112 failed checksum", "NEG: Luhn-invalid"),
    ("Account ref 5555 5555 5555 5555", "NEG: Luhn-invalid MC-like"),
    ("Order id 1234567890123456 created", "NEG: Luhn-invalid 16 digits"),
    ("Batch 0000 0000 0000 0000 reserved", "NEG: zeros (no network)"),
    ("IMEI 35-209900-176148-1 registered", "NEG: IMEI (Luhn-valid 15 digits, not a card)"),
    ("Serial 8901 2345 6789 0123 456", "NEG: 19 digits, Luhn-invalid"),
    ("Sequence: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16", "NEG: counting"),

    # ----------------------------------------------------------------------------------------------- iban
    ("IBAN: [[iban:DE89 3704 0044 0532 0130 00]]", "DE print"),
    ("Bitte überweisen Sie auf [[iban:DE89370400440532013000]] (BIC COBADEFFXXX).", "DE compact"),
    ("Pay to [[iban:GB29 NWBK 6016 1331 9268 19]], ref INV-2291", "GB"),
    ("IBAN [[iban:FR14 2004 1010 0505 0001 3M02 606]]", "FR"),
    ("Rekening: [[iban:NL91 ABNA 0417 1643 00]]", "NL"),
    ("Cuenta: [[iban:ES91 2100 0418 4502 0005 1332]]", "ES"),
    ("IBAN [[iban:IT60 X054 2811 1010 0000 0123 456]]", "IT"),
    ("Compte [[iban:BE68 5390 0754 7034]]", "BE"),
    ("Konto [[iban:CH93 0076 2011 6238 5295 7]]", "CH"),
    ("IBAN: [[iban:AT61 1904 3002 3457 3201]]", "AT"),
    ("Numer konta: [[iban:PL61 1090 1014 0000 0712 1981 2874]]", "PL"),
    ("Kontonummer [[iban:SE45 5000 0000 0583 9825 7466]]", "SE"),
    ("Konto: [[iban:NO93 8601 1117 947]]", "NO (short)"),
    ("IBAN [[iban:DK50 0040 0440 1162 43]]", "DK"),
    ("Account: [[iban:IE29 AIBK 9311 5212 3456 78]]", "IE"),
    ("NIB/IBAN: [[iban:PT50 0002 0123 1234 5678 9015 4]]", "PT"),
    ("Tilinumero [[iban:FI21 1234 5600 0007 85]]", "FI"),
    ("IBAN [[iban:LU28 0019 4006 4475 0000]]", "LU"),
    ("IBAN: [[iban:GR16 0110 1250 0000 0001 2300 695]]", "GR"),
    ("IBAN: [[iban:SA03 8000 0000 6080 1016 7519]]", "SA"),
    ("Beneficiary IBAN: [[iban:AE07 0331 2345 6789 0123 456]]", "AE"),
    ("iban=[[iban:GB82WEST12345698765432]]&bic=WESTGB2L", "GB compact in query string"),
    ("IBAN DE89 3704 0044 0532 0130 01 (typo, rejected by the bank)", "NEG: bad checksum"),
    ("GB00 NWBK 6016 1331 9268 19 is not valid", "NEG: bad check digits"),
    ("Product code DE12 ABCD 3456 EFGH", "NEG: IBAN-shaped product code"),
    ("BIC COBADEFFXXX, SWIFT DEUTDEFF500", "NEG: BICs"),

    # ------------------------------------------------------------------------------------------------ ssn
    ("SSN: [[ssn:523-81-4467]]", "SSN with label"),
    ("Employee social security number [[ssn:301-42-7785]] on file.", "SSN prose"),
    ("Applicant: John Q. Public, DOB 04/12/1986, SSN [[ssn:665-12-3456]]", "665 area is valid"),
    ("ssn=[[ssn:412-67-3390]]&dob=1990-01-01", "query string"),
    ("SSN [[ssn:523 81 4467]] (spaces)", "spaced SSN with label"),
    ("SSN#: [[ssn:301427785]]", "compact SSN with label"),
    ('{"name": "Ann Lee", "ssn": "[[ssn:772-21-0934]]"}', "JSON"),
    ("Tax ID [[ssn:899-45-1234]] verified", "899 area valid"),
    ("SSN 000-12-3456 is invalid (area 000)", "NEG: area 000"),
    ("666-45-6789 can never be issued", "NEG: area 666"),
    ("Invalid group: 123-00-4567; invalid serial: 123-45-0000", "NEG: zero group/serial"),
    ("Part no. 12-345-6789 and lot 2024-03-0015", "NEG: part/lot numbers"),
    ("Call 555-12-34 (DE local)", "NEG: not an SSN pattern"),

    # --------------------------------------------------------------------------------------------- secret
    ("aws_access_key_id = [[secret:AKIAIOSFODNN7EXAMPLE]]\naws_secret_access_key = [[secret:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY]]", "AWS credentials file (secret key by context)"),
    ("export AWS_ACCESS_KEY_ID=[[secret:AKIA2E0A8F3B244C9986]]", "AWS key in shell"),
    ("token: [[secret:ghp_1a2B3c4D5e6F7g8H9i0JkLmNoPqRsTuVwXyZ]]", "GitHub classic PAT"),
    ("GITHUB_TOKEN=[[secret:github_pat_11ABCDEFG0123456789abc_ZyXwVuTsRqPoNmLkJiHgFeDcBa9876543210zyxwvutsrqponmlkjihgfed]]", "GitHub fine-grained PAT"),
    ("SLACK_BOT_TOKEN=[[secret:xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx]]", "Slack bot token"),
    ("stripe.api_key = \"[[secret:sk_live_51HqLyjWDarjtT1zdp7dcXwY4]]\"", "Stripe live key"),
    ('const firebaseConfig = { apiKey: "[[secret:AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe]]", authDomain: "x.firebaseapp.com" };', "Google API key"),
    ("Authorization: Bearer [[secret:" + JWT + "]]", "Bearer JWT"),
    ("curl -H 'Authorization: Bearer [[secret:8f3a9c2e71d44b0f9e6a5c3d2b1a0f9e]]' https://api.acme.io/v2/me", "opaque Bearer token"),
    ("id_token=[[secret:" + JWT2 + "]]", "JWT in query string"),
    ("-- key.pem --\n[[secret:" + PEM_RSA + "]]\n", "PEM RSA private key"),
    ("Here is my key (I know, I know):\n[[secret:" + PEM_PKCS8 + "]]", "PEM PKCS8 private key"),
    ("[[secret:" + PEM_OPENSSH + "]]", "OpenSSH private key"),
    ('key = """[[secret:' + PEM_EC + ']]"""', "EC private key in code"),
    ("Authorization: Basic [[secret:YWRtaW46UzNjcjN0UGFzc3dvcmQh]]", "Basic auth credentials"),
    ("headers = {'Authorization': 'token [[secret:ghp_Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2Rr1Qq0PpOoNn]]'}", "GitHub token header"),
    ("webhook: https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX", "NEG: placeholder Slack webhook"),
    ("Set Authorization: Bearer <YOUR_TOKEN_HERE> in the request.", "NEG: placeholder bearer"),
    ("export GITHUB_TOKEN=ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", "NEG: placeholder token (all x)"),
    ("Your key looks like AKIA... and is 20 characters long.", "NEG: prose about AWS keys"),
    (PEM_PUBLIC, "NEG: public key block"),
    (PEM_CERT, "NEG: certificate block"),
    ("commit a94a8fe5ccb19ba61c4c0873d391e987982fbbd3\nMerge: 1f3c2d4 9e8b7a6", "NEG: git SHAs"),
    ("sha256sum: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  empty.txt", "NEG: hash"),
    ("request_id=550e8400-e29b-41d4-a716-446655440000 trace=4bf92f3577b34da6a3ce929d0e0e4736", "NEG: UUID / trace id"),
    ("color: #ff00aa; background: #0a0b0c; border-color: #FFF;", "NEG: hex colours"),
    ('<img src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==">', "NEG: data URI"),
    ("stripe.api_key = 'sk_live_...'  # set via env", "NEG: elided key"),

    # ------------------------------------------------------------------------------------- mixed / realistic
    ("Hi, I'm Carla. You can reach me at [[email:carla.m@posteo.de]] or [[phone:+49 176 23456789]]. Thanks!", "forum signature"),
    ("Name: Peter Wong\nEmail: [[email:pwong@hku.hk]]\nPhone: [[phone:+852 2859 2111]]\nCard: [[credit_card:4111-1111-1111-1111]]", "form dump, HK phone"),
    ("2024-03-15 14:02:11,532 ERROR [auth] login failed user=[[email:mark@shop.example]] ip=[[ipv4:77.88.55.60]]", "app log; .example TLD is a reserved docs TLD, still syntactically an address"),
    ("Payment from [[iban:NL91 ABNA 0417 1643 00]] (J. de Vries, [[email:jdevries@ziggo.nl]]) received on 12-03-2024.", "bank statement line"),
    ("DATABASE_URL=postgres://app:[[secret:hunter2]]@10.0.3.7:5432/prod\nSENTRY_DSN=https://abc123@o12345.ingest.sentry.io/67890", "password in URL userinfo is a secret (relabelled: a reviewer wants it gone); DSN userinfo is not an e-mail"),
    ("Contact the landlord on [[phone:0412 345 678]] — rent is $1,850/month, bond $7,400.", "AU listing with prices"),
    ("Call me!!! [[phone:(617) 555-0147]] or [[email:bigfan_1987@hotmail.com]] xoxo", "forum spam"),
    ("Server A: [[ipv4:34.102.136.180]] / [[ipv6:2600:1901:0:6d85::]]\nServer B: 10.128.0.12", "inventory list"),
    ("Patient DOB 1975-08-22, MRN 00451234, SSN [[ssn:219-55-0192]], phone [[phone:(555) 867-5309]]", "medical record"),
    ("v2.3.4 released on 2024-01-31 — see https://github.com/acme/tool/releases/tag/v2.3.4", "NEG: release"),
    ("Price: €1.299,00 (inkl. MwSt.) — Artikelnr. 4711-0815-42", "NEG: price and article number"),
    ("GPS: -33.8688, 151.2093; elevation 58 m", "NEG: coordinates"),
    ("Use `font-size: 1.125rem; line-height: 1.75;` and `@supports (display: grid)`", "NEG: CSS"),
    ("Meeting ID: 845 2931 0476, passcode 482913", "NEG: meeting id"),
    ("For 3x + 2y = 12 and x - y = 1, solve (x, y) = (2.8, 1.8).", "NEG: math"),
    ("Confirmation code: XK7-99B-21Q; booking ref 6PQ2ZL", "NEG: booking codes"),
    ("uuid 123e4567-e89b-12d3-a456-426614174000, etag \"33a64df551425fcc55e4d42a148795d9f25f89d4\"", "NEG: uuid and etag"),
    ("Chapter 12: 1984-1989; Appendix B.2.3.1", "NEG: chapter and years"),
    ("He was born on 12/03/1987 and moved on 3/4/2001.", "NEG: dates"),
    ("Stock AAPL closed at 172.62 (+1.23, +0.72%) on volume 54,320,118.", "NEG: market data"),

    # ------------------------------------------------------------------------------------- more per-kind support
    ("Oct 02 11:04:55 fw kernel: [UFW BLOCK] IN=eth0 SRC=[[ipv4:198.98.51.189]] DST=10.0.0.4 PROTO=TCP SPT=4455 DPT=23", "UFW log, private DST"),
    ("fail2ban.actions: NOTICE [sshd] Ban [[ipv4:218.92.0.107]]", "fail2ban"),
    ("proxy_pass http://[[ipv4:104.16.132.229]]:80;", "proxy_pass"),
    ("Received: from mail-ed1-f54.google.com ([[ipv4:209.85.208.54]]) by mx.acme.io", "mail Received header"),
    ("clients: [[ipv4:73.162.14.201]], [[ipv4:24.48.0.1]], 192.168.0.10", "list with private"),
    ("Whitelisted IPs: [[ipv4:3.121.6.180]]/32 and [[ipv4:18.197.4.24]]/32", "CIDR list"),
    ("the guy posting from [[ipv4:88.198.12.44]] keeps spamming the forum", "forum moderation"),
    ("inet [[ipv4:139.59.144.3]]/20 brd [[ipv4:139.59.159.255]] scope global eth0", "ip addr output; the public broadcast address names the host's network too (relabelled after first run)"),
    ("2024-03-15 10:01:22 [[ipv6:2001:67c:2e8:22::c100:68b]] GET /robots.txt 200", "log v6"),
    ("Address: [[ipv6:2620:fe::fe]]#53", "dig server line"),
    ("ip6tables -A INPUT -s [[ipv6:2a0b:4140:8d11::1]] -j DROP", "ip6tables"),
    ("[[ipv6:2804:14c:5b80:8a1f:a5b3:2e0c:9f11:4d27]] - - [15/Mar/2024:12:00:01 +0000] \"GET / HTTP/2\" 200", "apache log v6"),
    ("AAAA [[ipv6:2a02:26f0:fd::5c7a:1b4c]] TTL 300", "DNS record"),
    ("Mar 15 12:00:01 host dhcpd: lease ff02::1:2 requested", "NEG: multicast v6"),
    ("Use ::1 or localhost; fe80::/10 is link-local, ::/0 is the default route", "NEG: v6 specials in prose"),
    ("Format hh:mm:ss, e.g. 23:59:59; durations 1:30:00", "NEG: clock times"),
    ("Card on file: [[credit_card:4000 0025 0000 3155]] (3DS test)", "Visa 3DS test"),
    ("mastercard [[credit_card:5200 8282 8282 8210]] debit", "MC debit test"),
    ("Payment failed for card [[credit_card:6011-0009-9013-9424]]", "Discover dashes"),
    ("AMEX [[credit_card:3714-496353-98431]]", "Amex dashes 4-6-5"),
    ("Number: [[credit_card:5425233430109903]] Exp: 04/2026 CVV: 372", "MC compact with expiry"),
    ("Customer typed [[credit_card:4539 1488 0343 6467]] into the notes field", "Visa-range Luhn-valid number in notes"),
    ("order 7731 2290 1106 4458 shipped", "NEG: Luhn-invalid order number"),
    ("SSN: [[ssn:142-33-7718]]; DOB: 1969-07-20", "SSN with DOB"),
    ("W-2 box a: [[ssn:287-65-4321]]", "W-2"),
    ("My SSN is [[ssn:530-44-9102]], please don't share lol", "forum overshare"),
    ("social: [[ssn:604-12-8833]]", "abbrev label"),
    ("ssn,name\n[[ssn:401-55-6621]],Alice\n[[ssn:212-90-4417]],Bob", "CSV"),
    ("Case 2021-09-1234 filed on 09-14-2021", "NEG: case number, date"),
    ("ISBN 978-1-4028-9462-6; ISSN 2049-3630", "NEG: ISBN/ISSN"),
    ("SLACK_WEBHOOK_TOKEN=[[secret:xoxp-2480123456-2480987654-5123456789012-0a1b2c3d4e5f60718293a4b5c6d7e8f9]]", "Slack user token"),
    ("STRIPE_SECRET_KEY=[[secret:sk_live_4eC39HqLyjWDarjtT1zdp7dc]]", "Stripe live key env"),
    ("rk = '[[secret:rk_live_51H8aBcDeFgHiJkLmNoPqRsTu]]'", "Stripe restricted live key"),
    ("maps.googleapis.com/maps/api/js?key=[[secret:AIzaSyB1x2c3V4b5N6m7Q8w9E0r1T2y3U4i5O6p]]&callback=init", "Google key in URL"),
    ("AWS_ACCESS_KEY_ID: [[secret:AKIAJ7Q3XKZL4MPN2W6A]]", "AWS key YAML"),
    ("GH_TOKEN=[[secret:gho_16C7e42F292c6912E7710c838347Ae178B4a]]", "GitHub OAuth token"),
    ("Cookie: session=[[secret:" + JWT + "]]; theme=dark", "JWT in cookie"),
    ("Authorization: Bearer [[secret:ya29.a0AfB_byC1dE2fG3hI4jK5lM6nO7pQ8rS9tU0vW1xY2z]]", "Google OAuth access token"),
    ("password: ${DB_PASSWORD}\napi_key: {{ .Values.apiKey }}", "NEG: templated values"),
    ("Token format: ghp_ followed by 36 alphanumerics", "NEG: docs about format"),
    ("AKIA keys must be rotated every 90 days", "NEG: AKIA word"),
    ("Bearer tokens expire after 3600 seconds", "NEG: Bearer in prose"),
    ("Please email [[email:hr@people.acme-corp.com]] your IBAN ([[iban:DE75 5121 0800 1245 1261 99]]) and phone.", "HR request"),
    ("Überweisung an [[iban:AT48 3200 0000 1234 5864]], Verwendungszweck: Rechnung 2024-0117", "AT with invoice ref"),
    ("RIB / IBAN : [[iban:FR76 3000 6000 0112 3456 7890 189]]", "FR76"),
    ("IBAN: [[iban:HR12 1001 0051 8630 0016 0]]", "HR"),
    ("IBAN: [[iban:RO49 AAAA 1B31 0075 9384 0000]]", "RO"),
    ("IBAN [[iban:TR33 0006 1005 1978 6457 8413 26]]", "TR"),
    ("IBAN: [[iban:CZ65 0800 0000 1920 0014 5399]]", "CZ"),
    ("Kontonr. 1234 5678 90, BLZ 370 400 44", "NEG: old DE account number and sort code"),
    ("Sort code 20-00-00, account 55779911", "NEG: UK sort code/account (not IBAN)"),
]
# fmt: on

NEGATIVE_LITERALS_MUST_FAIL_CHECKS = {
    "luhn": [
        "4111111111111112",
        "7731229011064458",
        "5555555555555555",
        "1234567890123456",
        "8901234567890123456",
    ],
    "iban": ["DE89370400440532013001", "GB00NWBK60161331926819"],
}


def parse(marked: str) -> tuple[str, list[dict[str, object]]]:
    out: list[str] = []
    spans: list[dict[str, object]] = []
    pos = 0
    length = 0
    for m in MARK.finditer(marked):
        before = marked[pos : m.start()]
        out.append(before)
        length += len(before)
        kind, value = m.group(1), m.group(2)
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} in {marked!r}")
        spans.append({"kind": kind, "start": length, "end": length + len(value)})
        out.append(value)
        length += len(value)
        pos = m.end()
    out.append(marked[pos:])
    text = "".join(out)
    if "[[" in text or "]]" in text:
        raise ValueError(f"unbalanced markup in {marked!r}")
    return text, spans


def check(kind: str, value: str) -> None:
    """Sanity checks so that a typo in a literal cannot silently become a wrong label."""
    digits = re.sub(r"\D", "", value)
    if kind == "credit_card":
        assert luhn(digits) and 13 <= len(digits) <= 19, value
    elif kind == "iban":
        assert iban_ok(value), value
    elif kind == "ssn":
        assert len(digits) == 9 and digits[:3] not in ("000", "666") and digits[0] != "9", value
        assert digits[3:5] != "00" and digits[5:] != "0000", value
    elif kind == "email":
        assert re.fullmatch(r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}", value), value
    elif kind == "secret":
        prefixes = {"AKIA": 20, "ghp_": 40, "AIza": 39}
        for prefix, n in prefixes.items():
            if value.startswith(prefix):
                assert len(value) == n, (value, len(value))
        if value.startswith("github_pat_"):
            assert re.fullmatch(r"github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}", value), value


def build() -> list[dict[str, object]]:
    for digits in NEGATIVE_LITERALS_MUST_FAIL_CHECKS["luhn"]:
        assert not luhn(digits), digits
    for iban in NEGATIVE_LITERALS_MUST_FAIL_CHECKS["iban"]:
        assert not iban_ok(iban), iban
    rows = []
    for marked, note in CASES:
        text, spans = parse(marked)
        for s in spans:
            check(str(s["kind"]), text[int(s["start"]) : int(s["end"])])  # type: ignore[call-overload]
        rows.append({"text": text, "spans": spans, "note": note})
    return rows


def render(rows: list[dict[str, object]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main() -> None:
    rows = build()
    OUT.write_text(render(rows), encoding="utf-8")
    n = sum(len(r["spans"]) for r in rows)  # type: ignore[arg-type]
    print(f"wrote {len(rows)} cases ({n} spans) to {OUT}")


if __name__ == "__main__":
    main()
