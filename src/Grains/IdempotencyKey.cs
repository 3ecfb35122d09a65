using System.Buffers;
using System.Globalization;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using System.Text;

namespace OrleansIdempotency.Grains;

/// <summary>An idempotency key within its scope (a user, a tenant, an API key): one grain each.</summary>
/// <param name="Scope">Whose key it is. The same key in two scopes names two independent keys.</param>
/// <param name="Key">The client's <c>Idempotency-Key</c>.</param>
public readonly record struct IdempotencyKey(string Scope, string Key)
{
    /// <summary>The most UTF-8 bytes of a scope a grain key holds as it is; a longer one is stood for by its digest.</summary>
    public const int MaxScopeBytes = 2048;

    private const string Digest = "scope-sha256:";
    private const string Utf16Digest = "scope-utf16-sha256:";

    /// <summary>
    /// True when <see cref="Scope"/> is already as the grain key holds it: a digest an operator copied from a log, which
    /// would otherwise be digested again (as a client's scope that reads as a digest is, so that none forges another's).
    /// Never set it from a caller's input: a scope taken as stored can name any other scope's digested keys.
    /// </summary>
    public bool ScopeIsStored { get; init; }

    /// <summary>True when <paramref name="scope"/> has the form <see cref="StoredScope"/> gives a scope it digests.</summary>
    public static bool IsDigest(string scope) =>
        scope.StartsWith(Digest, StringComparison.Ordinal) || scope.StartsWith(Utf16Digest, StringComparison.Ordinal);

    /// <summary>The grain's primary key. The scope is length-prefixed, so no scope or key can forge another pair.</summary>
    public string ToGrainKey()
    {
        var scope = ScopeIsStored ? Scope : StoredScope(Scope);
        return string.Create(CultureInfo.InvariantCulture, $"{scope.Length}:{scope}:{Key}");
    }

    /// <summary>
    /// The scope as the grain key holds it: as it is, or its digest when the grain key could not hold it as it is. The
    /// grain key is part of its row in PostgreSQL's primary-key index, whose entries hold at most about 2.7 KB: a longer
    /// scope (a raw token in a header) would fail every write, answered 503 as if the store were down. The bound leaves
    /// room below that for a key of 255 characters. PostgreSQL's text holds no NUL (a JSON claim may: "\u0000"), and a
    /// grain key is UTF-8, where every lone surrogate becomes U+FFFD: two scopes would share one grain.
    /// </summary>
    public static string StoredScope(string scope)
    {
        var span = scope.AsSpan();
        if (HasLoneSurrogate(span))
        {
            // Hashed as it is, in UTF-16: its UTF-8 is the lossy form that merges scopes.
            return Utf16Digest + Convert.ToBase64String(SHA256.HashData(MemoryMarshal.AsBytes(span)));
        }

        // A UTF-16 character is at most 3 UTF-8 bytes: a short scope, every usual one, is not counted. A scope that
        // reads as a digest is digested too, so that none forges another's.
        return (scope.Length * 3 > MaxScopeBytes && Encoding.UTF8.GetByteCount(scope) > MaxScopeBytes)
            || span.Contains('\0') || IsDigest(scope)
            ? Digest + Convert.ToBase64String(SHA256.HashData(Encoding.UTF8.GetBytes(scope)))
            : scope;
    }

    /// <summary>True when <paramref name="text"/> holds half of a surrogate pair alone, which UTF-8 cannot hold.</summary>
    public static bool HasLoneSurrogate(ReadOnlySpan<char> text)
    {
        if (text.IndexOfAnyInRange('\uD800', '\uDFFF') < 0)
        {
            return false;
        }

        while (!text.IsEmpty)
        {
            if (Rune.DecodeFromUtf16(text, out _, out var used) != OperationStatus.Done)
            {
                return true;
            }

            text = text[used..];
        }

        return false;
    }

    /// <inheritdoc/>
    public override string ToString() => ToGrainKey();
}

/// <summary>Finds the grain of an <see cref="IdempotencyKey"/>.</summary>
public static class IdempotencyGrainFactoryExtensions
{
    // GetGrain<T>(string) resolves T's grain type by reflection (its attributes, its formatted name) on every call,
    // 1.5-2 µs each time a request reaches a key's grain. The answer never changes for a factory: resolved once.
    private static readonly ConditionalWeakTable<IGrainFactory, GrainTypes> TypesByFactory = new();

    /// <summary>The grain that owns <paramref name="key"/>.</summary>
    public static IIdempotencyGrain GetIdempotencyGrain(this IGrainFactory grains, IdempotencyKey key)
    {
        var types = TypesByFactory.GetValue(grains, GrainTypes.Resolve);
        return (IIdempotencyGrain)grains.GetGrain(GrainId.Create(types.Grain, key.ToGrainKey()), types.Interface);
    }

    private sealed record GrainTypes(GrainType Grain, GrainInterfaceType Interface)
    {
        public static GrainTypes Resolve(IGrainFactory grains)
        {
            // Any key will do: only the types of the reference are kept.
            var reference = (GrainReference)grains.GetGrain<IIdempotencyGrain>("0:");
            return new(reference.GrainId.Type, reference.InterfaceType);
        }
    }
}
