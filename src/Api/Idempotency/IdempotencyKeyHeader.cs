using Microsoft.Extensions.Primitives;

namespace OrleansIdempotency.AspNetCore;

/// <summary>
/// Reads the <c>Idempotency-Key</c> request header (draft-ietf-httpapi-idempotency-key-header-07 §2: an Item
/// Structured Header, RFC 8941). Accepted: a quoted sf-string (printable ASCII, <c>\"</c> and <c>\\</c> escapes) or
/// a bare token. Bare tokens follow RFC 9110 (<c>tchar</c>, plus the <c>:</c> and <c>/</c> of RFC 8941 tokens) so that
/// the UUIDs most clients send are accepted although RFC 8941 tokens may not start with a digit. Refused: no
/// value, several values, empty, more than <see cref="MaxLength"/> characters, parameters, commas, control
/// characters and non-ASCII.
/// </summary>
public static class IdempotencyKeyHeader
{
    /// <summary>The header's name.</summary>
    public const string Name = "Idempotency-Key";

    /// <summary>The longest key accepted, in characters.</summary>
    public const int MaxLength = 255;

    /// <summary>The outcome of reading the header.</summary>
    public enum Status
    {
        /// <summary>A valid key.</summary>
        Valid,

        /// <summary>The request carries no key.</summary>
        Missing,

        /// <summary>The request carries something that is not one valid key.</summary>
        Invalid,
    }

    /// <summary>Reads the key from the header's values; <paramref name="error"/> says what is wrong when invalid.</summary>
    public static Status TryRead(StringValues values, out string key, out string error)
    {
        key = "";
        error = "";
        if (values.Count == 0)
        {
            return Status.Missing;
        }

        if (values.Count > 1)
        {
            error = $"The request has {values.Count} {Name} headers; send exactly one.";
            return Status.Invalid;
        }

        var value = (values[0] ?? "").Trim(' ');
        var parsed = value.StartsWith('"') ? ReadString(value, out key) : ReadToken(value, out key);
        if (parsed is not null)
        {
            error = parsed;
            return Status.Invalid;
        }

        if (key.Length == 0)
        {
            error = $"The {Name} is empty.";
            return Status.Invalid;
        }

        if (key.Length > MaxLength)
        {
            error = $"The {Name} has {key.Length} characters; at most {MaxLength} are allowed.";
            return Status.Invalid;
        }

        return Status.Valid;
    }

    private static string? ReadToken(string value, out string key)
    {
        key = value;
        foreach (var c in value)
        {
            if (!IsTokenChar(c))
            {
                return $"The {Name} contains {Describe(c)}: use a quoted string or a token (letters, digits and !#$%&'*+-.^_`|~:/).";
            }
        }

        return null;
    }

    private static string? ReadString(string value, out string key)
    {
        key = "";
        var result = new System.Text.StringBuilder(value.Length);
        for (var i = 1; i < value.Length; i++)
        {
            var c = value[i];
            if (c == '\\')
            {
                if (i + 1 >= value.Length || value[i + 1] is not ('"' or '\\'))
                {
                    return $"The {Name} has an invalid escape; only \\\" and \\\\ are allowed in a quoted string.";
                }

                result.Append(value[++i]);
            }
            else if (c == '"')
            {
                if (i != value.Length - 1)
                {
                    return $"The {Name} has characters (or parameters) after its closing quote.";
                }

                key = result.ToString();
                return null;
            }
            else if (c is < ' ' or > '~' || c == ',')
            {
                return $"The {Name} contains {Describe(c)}.";
            }
            else
            {
                result.Append(c);
            }
        }

        return $"The {Name} has no closing quote.";
    }

    private static bool IsTokenChar(char c) =>
        c is (>= 'a' and <= 'z') or (>= 'A' and <= 'Z') or (>= '0' and <= '9')
            or '!' or '#' or '$' or '%' or '&' or '\'' or '*' or '+' or '-' or '.' or '^' or '_' or '`' or '|' or '~' or ':' or '/';

    private static string Describe(char c) => c switch
    {
        ',' => "a comma",
        ';' => "a ';' (parameters are not accepted)",
        < ' ' or '\x7f' => $"a control character (U+{(int)c:X4})",
        > '~' => $"a non-ASCII character (U+{(int)c:X4})",
        _ => $"'{c}'",
    };
}
