"""Validates an X.509-SVID the way a py-spiffe workload would.

usage: svid_check.py CHAIN_PEM KEY_PEM BUNDLE_PEM

Parses the chain and key with spiffe.X509Svid (which enforces the SVID
profile: one SPIFFE URI SAN, CA:FALSE, digitalSignature, no keyCertSign),
parses the bundle with spiffe.X509Bundle for the SVID's trust domain, then
checks each certificate's signature up to an authority of the bundle.
Prints the SPIFFE id; exits non-zero with a reason on any failure.
"""

import sys

from spiffe import X509Bundle, X509Svid


def main() -> int:
    chain_path, key_path, bundle_path = sys.argv[1:4]
    with open(chain_path, "rb") as f:
        chain = f.read()
    with open(key_path, "rb") as f:
        key = f.read()
    with open(bundle_path, "rb") as f:
        bundle_pem = f.read()
    try:
        svid = X509Svid.parse(chain, key)
        bundle = X509Bundle.parse(svid.spiffe_id.trust_domain, bundle_pem)
        certs = svid.cert_chain
        for child, parent in zip(certs, certs[1:]):
            child.verify_directly_issued_by(parent)
        top = certs[-1]
        for authority in bundle.x509_authorities:
            try:
                top.verify_directly_issued_by(authority)
                break
            except Exception:  # noqa: BLE001 - try the next authority
                continue
        else:
            print("chain does not lead to an authority of the bundle", file=sys.stderr)
            return 2
    except Exception as e:  # noqa: BLE001 - any parse/verify failure is a verdict
        print(f"invalid SVID: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(svid.spiffe_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
