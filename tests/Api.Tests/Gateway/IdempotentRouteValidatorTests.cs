using Microsoft.Extensions.Options;
using OrleansIdempotency.Api.Gateway;
using OrleansIdempotency.AspNetCore;
using Yarp.ReverseProxy.Configuration;

namespace OrleansIdempotency.Api.Tests.Gateway;

/// <summary>What a gateway route's idempotency metadata may say; a refusal stops the gateway at start, or a reload.</summary>
public sealed class IdempotentRouteValidatorTests
{
    private readonly IdempotentRouteValidator validator = new(Options.Create(new IdempotencyOptions()));

    private static RouteConfig Route(Dictionary<string, string> metadata) =>
        new() { RouteId = "charges", ClusterId = "payments", Match = new RouteMatch { Path = "/charges" }, Metadata = metadata };

    [Theory]
    [InlineData("X-Api-Key")]
    [InlineData("")]
    public async Task IdempotentRoute_WithAScopeHeaderNameOrNone_IsTaken(string scopeHeader)
    {
        var route = Route(new() { [GatewayExtensions.PolicyMetadata] = GatewayExtensions.DefaultPolicyName, [GatewayExtensions.ScopeHeaderMetadata] = scopeHeader });

        Assert.Same(route, await validator.ConfigureRouteAsync(route, null, CancellationToken.None));
    }

    [Theory]
    [InlineData("X Api Key")]
    [InlineData("X-Api-Key:")]
    [InlineData("X-Ápi-Key")]
    public async Task ScopeHeaderThatIsNoHeaderName_IsRefused_ForNoRequestCouldCarryIt(string scopeHeader)
    {
        var route = Route(new() { [GatewayExtensions.PolicyMetadata] = GatewayExtensions.DefaultPolicyName, [GatewayExtensions.ScopeHeaderMetadata] = scopeHeader });

        var refused = await Assert.ThrowsAsync<InvalidOperationException>(() => validator.ConfigureRouteAsync(route, null, CancellationToken.None).AsTask());

        Assert.Contains(scopeHeader, refused.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task ScopeHeaderWithoutAnIdempotencyPolicy_IsRefused_NotLeftForwardingEveryRetry()
    {
        var route = Route(new() { [GatewayExtensions.ScopeHeaderMetadata] = "X-Api-Key" });

        var refused = await Assert.ThrowsAsync<InvalidOperationException>(() => validator.ConfigureRouteAsync(route, null, CancellationToken.None).AsTask());

        Assert.Contains(GatewayExtensions.PolicyMetadata, refused.Message, StringComparison.Ordinal);
    }
}
