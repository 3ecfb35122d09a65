namespace OrleansIdempotency.Grains.Tests;

[Collection(ClusterCollection.Name)]
public sealed class IdempotencyKeyTests(ClusterFixture fixture)
{
    [Fact]
    public void GrainOfAKey_IsTheGrainOrleansNamesForItsStringKey()
    {
        // Records are stored under the grain id: a key must keep naming the grain (and so the record) it always named.
        var key = new IdempotencyKey("alice", Guid.NewGuid().ToString("N"));
        var expected = (GrainReference)fixture.Grains.GetGrain<IIdempotencyGrain>(key.ToGrainKey());

        var grain = (GrainReference)fixture.Grains.GetIdempotencyGrain(key);

        Assert.Equal(expected.GrainId, grain.GrainId);
        Assert.Equal(expected.InterfaceType, grain.InterfaceType);
        Assert.NotEqual(grain.GrainId, ((GrainReference)fixture.Grains.GetIdempotencyGrain(key with { Scope = "bob" })).GrainId);
    }

    [Theory]
    [InlineData("a:b", "c", "a", "b:c")]
    [InlineData("1:a", "b", "1", "a:b")]
    [InlineData("", "3:a:b", ":3", "a:b")]
    public void GrainKey_OfOneScopeAndKey_IsNeverThatOfAnother(string scope, string key, string otherScope, string otherKey)
    {
        Assert.Equal(scope + ":" + key, otherScope + ":" + otherKey);

        Assert.NotEqual(new IdempotencyKey(scope, key).ToGrainKey(), new IdempotencyKey(otherScope, otherKey).ToGrainKey());
    }

    [Theory]
    [InlineData('a', 2048, false)]
    [InlineData('a', 2049, true)]
    [InlineData('\u00e9', 1024, false)]
    [InlineData('\u20ac', 683, true)]
    public void Scope_IsBoundedByItsUtf8Bytes_NotItsCharacters(char character, int count, bool digested)
    {
        var scope = new string(character, count);

        Assert.Equal(digested, IdempotencyKey.StoredScope(scope) != scope);
        Assert.NotEqual(new IdempotencyKey(scope, "k").ToGrainKey(), new IdempotencyKey(scope + "x", "k").ToGrainKey());
    }

    [Fact]
    public void Scope_ThatReadsAsAnotherScopesDigest_NamesAnotherGrainKey()
    {
        var longScope = new string('a', IdempotencyKey.MaxScopeBytes + 1);
        var digest = IdempotencyKey.StoredScope(longScope);

        Assert.NotEqual(new IdempotencyKey(longScope, "k").ToGrainKey(), new IdempotencyKey(digest, "k").ToGrainKey());
    }

    // Built here: an attribute's strings are stored as UTF-8, which would turn these into U+FFFD before the test ran.
    private static readonly (string Scope, string Other)[] Unholdable = [("x\uD800", "x\uDBFF"), ("x\uDC00y", "x\uFFFDy"), ("a\0b", "a\0c")];

    [Theory]
    [InlineData(0)]
    [InlineData(1)]
    [InlineData(2)]
    public void Scopes_ThatUtf8OrPostgresTextCannotHold_NameGrainKeysOfTheirOwn_ThatBothCanHold(int pair)
    {
        var (scope, other) = Unholdable[pair];
        var grainKey = new IdempotencyKey(scope, "k").ToGrainKey();

        Assert.NotEqual(grainKey, new IdempotencyKey(other, "k").ToGrainKey());
        Assert.Equal(grainKey, System.Text.Encoding.UTF8.GetString(System.Text.Encoding.UTF8.GetBytes(grainKey)));
        Assert.DoesNotContain('\0', grainKey);
    }

    [Fact]
    public void Scope_WithAPairOfSurrogates_IsHeldAsItIs()
    {
        Assert.Equal("x\uD83D\uDE00", IdempotencyKey.StoredScope("x\uD83D\uDE00"));
    }
}
