using System.Buffers;

namespace OrleansIdempotency.AspNetCore;

/// <summary>RFC 9110's token: what a header's name is made of.</summary>
internal static class HttpToken
{
    /// <summary>The characters a token takes, as a message names them.</summary>
    public const string Describe = "letters, digits and !#$%&'*+-.^_`|~";

    private static readonly SearchValues<char> Characters =
        SearchValues.Create("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz");

    /// <summary>True for a name a header can have.</summary>
    public static bool IsFieldName(string? name) => !string.IsNullOrEmpty(name) && !name.AsSpan().ContainsAnyExcept(Characters);
}
