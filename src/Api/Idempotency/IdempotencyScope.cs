using System.Security.Claims;
using System.Security.Cryptography;
using System.Text;

namespace OrleansIdempotency.AspNetCore;

/// <summary>
/// Ready-made <see cref="IdempotencyPolicy.Scope"/> resolvers. Each names its kind (<c>user:</c>, <c>claim:</c>,
/// <c>header:</c>, <c>header-sha256:</c>), so a user whose id is <c>anonymous</c>, or a header value equal to a user
/// id, never shares keys with another kind of caller.
/// </summary>
public static class IdempotencyScope
{
    /// <summary>The scope shared by every caller without one, when <see cref="IdempotencyPolicy.AllowAnonymous"/>.</summary>
    public const string Anonymous = "anonymous";

    /// <summary>
    /// The authenticated user (<see cref="ClaimTypes.NameIdentifier"/>, or a token's <c>sub</c> where its handler
    /// keeps the claim's own name), as <c>user:{id}</c>.
    /// </summary>
    public static string? User(HttpContext context) =>
        context.User.Identity?.IsAuthenticated == true
            && (context.User.FindFirst(ClaimTypes.NameIdentifier) ?? context.User.FindFirst("sub"))?.Value is { } id && !string.IsNullOrWhiteSpace(id)
            ? "user:" + id
            : null;

    /// <summary>
    /// The value of the authenticated caller's claim <paramref name="type"/> (a tenant id, say), as
    /// <c>claim:{type}:{value}</c>. An empty or blank value is none: every caller given one would otherwise share one scope.
    /// </summary>
    public static Func<HttpContext, string?> Claim(string type) =>
        context => context.User.Identity?.IsAuthenticated == true && context.User.FindFirst(type)?.Value is { } value && !string.IsNullOrWhiteSpace(value)
            ? $"claim:{type}:{value}"
            : null;

    /// <summary>
    /// The SHA-256 digest of a request header's value, as <c>header-sha256:{name}:{digest}</c>: for credentials
    /// (<c>Authorization</c>, say), which the scope would otherwise carry into grain ids, logs and the store.
    /// </summary>
    public static Func<HttpContext, string?> HeaderDigest(string name) =>
        context => context.Request.Headers[name] is { Count: 1 } values && !string.IsNullOrEmpty(values[0])
            ? $"header-sha256:{name}:{Convert.ToBase64String(SHA256.HashData(Encoding.UTF8.GetBytes(values[0]!)))}"
            : null;

    /// <summary>
    /// The value of a request header that names the caller and is no secret (a tenant id a trusted proxy sets, say), as
    /// <c>header:{name}:{value}</c>. The value goes into grain ids, logs and the store as it is: scope by a credential
    /// (an API key) with <see cref="HeaderDigest"/>.
    /// </summary>
    public static Func<HttpContext, string?> Header(string name) =>
        context => context.Request.Headers[name] is { Count: 1 } values && !string.IsNullOrEmpty(values[0])
            ? $"header:{name}:{values[0]}"
            : null;
}
